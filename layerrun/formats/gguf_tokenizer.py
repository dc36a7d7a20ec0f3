"""The tokenizer of a GGUF file: ``tokenizer.json`` built from llama.cpp's ``tokenizer.ggml.*`` metadata.

``tokenizer.json`` is built with the ``tokenizers`` library directly, porting
transformers' GGUF tokenizer conversion
(``transformers/integrations/gguf/gguf_tokenizer_mapping.py`` and the
GPT2/Llama/Gemma tokenizer classes it hands off to). Chosen over calling
transformers at conversion time because the port is under 200 lines and keeps
transformers a test-only dependency; the tests check that both give the same
ids on a fixed set of strings.

Kinds (``tokenizer.ggml.model``): ``gpt2`` (byte-level BPE) and ``llama``
(SentencePiece BPE with byte fallback, Gemma's variant included).

Everything here works on the file's metadata dict alone (as
:func:`layerrun.formats.gguf.read_header` returns it), so this module does not
depend on the tensor side of :mod:`layerrun.formats.gguf`:

- :func:`check_tokenizer` — fail early, with one line, on a kind not supported;
- :func:`tokenizer_from_metadata` — the ``tokenizers.Tokenizer``, the
  ``tokenizer_config.json`` dict and the chat template;
- :func:`write_tokenizer_files` — those three written into a model folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from layerrun.errors import FormatError, UnsupportedModelError

CONTROL, USER_DEFINED = 3, 4
TOKENIZER_KINDS = ("gpt2", "llama")  # byte-level BPE; SentencePiece BPE with byte fallback

# Pre-tokenizer splits for byte-level vocabularies, by `tokenizer.ggml.pre` (transformers' table).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _generate_merges(vocab: dict[str, int], scores: dict[str, float] | None) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary (transformers' ``generate_merges``, same order on ties).

    With ``scores``, merges sort by the merged token's score, best first; otherwise by its id.
    """
    reverse = scores is not None
    merges = []
    for merge, score in (scores if reverse else vocab).items():
        local = [
            (merge[:i], merge[i:], score) for i in range(1, len(merge)) if merge[:i] in vocab and merge[i:] in vocab
        ]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=reverse)
    return [(a, b) for a, b, _ in merges]


def _file_merges(meta: dict) -> list[tuple[str, str]] | None:
    m = meta.get("tokenizer.ggml.merges")
    return [tuple(x.split(" ", 1)) for x in m] if m else None


def has_tokenizer(meta: Mapping) -> bool:
    """Whether the file carries a vocabulary at all (a GGUF file may hold weights only)."""
    return "tokenizer.ggml.tokens" in meta


def check_tokenizer(meta: Mapping, file_name: str = "GGUF file") -> None:
    """Raise UnsupportedModelError, naming the file, if its vocabulary is of a kind not supported, and
    FormatError if its ``tokenizer.ggml.*`` metadata is not of the types llama.cpp writes."""
    kind = meta.get("tokenizer.ggml.model")
    if not has_tokenizer(meta):
        return
    if kind not in TOKENIZER_KINDS:
        raise UnsupportedModelError(
            f"{file_name}: GGUF tokenizer {kind!r} is not supported; supported: {', '.join(TOKENIZER_KINDS)}"
        )

    def bad(key: str, want: str):
        raise FormatError(f"{file_name}: tokenizer.ggml.{key} is not {want}; the file's vocabulary is damaged")

    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        bad("tokens", "a list of strings")
    for key, want, ok in (
        ("token_type", "a list of integers", lambda v: all(isinstance(x, int) for x in v)),
        ("scores", "a list of numbers, one per token",
         lambda v: len(v) == len(tokens) and all(isinstance(x, (int, float)) for x in v)),
        ("merges", "a list of 'a b' strings", lambda v: all(isinstance(x, str) and " " in x for x in v)),
    ):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and (not isinstance(v, list) or not ok(v)):
            bad(key, want)
    if kind == "llama" and not str(meta.get("general.architecture", "")).startswith("gemma"):
        if meta.get("tokenizer.ggml.merges") is None and meta.get("tokenizer.ggml.scores") is None:
            bad("scores", "present (a SentencePiece vocabulary without merges needs its scores)")
    for key in ("pre", "chat_template"):
        full = f"tokenizer.{key}" if key == "chat_template" else f"tokenizer.ggml.{key}"
        if meta.get(full) is not None and not isinstance(meta[full], str):
            raise FormatError(f"{file_name}: {full} is not a string")


def tokenizer_from_metadata(meta: Mapping, file_name: str = "GGUF file"):
    """(tokenizers.Tokenizer, tokenizer_config dict, chat template or None) for the file's vocabulary.

    ``meta`` is the file's metadata (``tokenizer.ggml.*``, ``general.architecture``,
    ``<arch>.context_length``); ``file_name`` only names the file in errors.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    arch = meta.get("general.architecture", "")
    kind = meta.get("tokenizer.ggml.model")
    tokens = raw = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    byte_level = kind == "gpt2"
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    if byte_level:
        vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i for i, t in enumerate(tokens)}
        merges = _file_merges(meta)
        if merges is None:
            merges = _generate_merges(vocab, None)
        tok = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
    elif kind == "llama":  # SentencePiece BPE with byte fallback
        gemma = arch.startswith("gemma")
        if gemma:
            # Gemma stores runs of spaces as real spaces; its merges follow file order, not the scores.
            tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = _file_merges(meta)
        if merges is None:
            scores = (
                {t: -i for i, t in enumerate(tokens)}
                if gemma
                else dict(zip(tokens, meta["tokenizer.ggml.scores"], strict=True))
            )
            merges = _generate_merges(vocab, scores)
        if gemma:
            tok = Tokenizer(
                BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>", dropout=None, byte_fallback=True)
            )
            tok.normalizer = normalizers.Replace(" ", "\u2581")
            tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
            tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        else:
            tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
            tok.decoder = decoders.Sequence(
                [
                    decoders.Replace("\u2581", " "),
                    decoders.ByteFallback(),
                    decoders.Fuse(),
                    decoders.Strip(content=" ", left=1),
                ]
            )
    else:
        raise UnsupportedModelError(
            f"{file_name}: GGUF tokenizer {kind!r} is not supported; supported: {', '.join(TOKENIZER_KINDS)}"
        )

    # Control tokens stay whole and are special; user-defined ones stay whole too. A control token
    # outside the byte alphabet of a byte-level vocabulary is a llama.cpp mislabel: skipped.
    # As transformers does, these are looked up by the file's spelling, before any respelling above.
    kinds = list(zip(raw, types, strict=False))
    control = [t for t, ty in kinds if ty == CONTROL and (not byte_level or set(t) <= alphabet)]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    known = tok.get_vocab(with_added_tokens=True)
    user = [t for t, ty in kinds if ty == USER_DEFINED and t in known]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return raw[i] if i is not None and 0 <= i < len(raw) else None

    special = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and special["bos_token"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and special["eos_token"] is not None
    # Special tokens the model names must be whole tokens even when the file does not mark them control.
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in special.values() if t is not None and t not in control]
    )
    bos, eos = special["bos_token"], special["eos_token"]
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    pair = " ".join([single] + [f"{bos}:1"] * add_bos + ["$B:1"] + [f"{eos}:1"] * add_eos)
    specials = ([(bos, tok.token_to_id(bos))] if add_bos else []) + ([(eos, tok.token_to_id(eos))] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{arch}.context_length", 2048)),
    }
    return tok, config, meta.get("tokenizer.chat_template")



def write_tokenizer_files(meta: Mapping, dst: str | Path, file_name: str = "GGUF file") -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja (if any) into ``dst``.

    Returns the names written: none when the file carries no vocabulary.
    """
    if not has_tokenizer(meta):
        return []
    dst = Path(dst)
    check_tokenizer(meta, file_name)
    try:
        tok, tok_cfg, template = tokenizer_from_metadata(meta, file_name)
    except (FormatError, UnsupportedModelError):
        raise
    except Exception as e:  # the tokenizers library raises plain Exceptions on a vocabulary it cannot build
        raise FormatError(f"{file_name}: cannot build a tokenizer from its vocabulary ({e})") from None
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    written = ["tokenizer.json", "tokenizer_config.json"]
    if template:
        (dst / "chat_template.jinja").write_text(template)
        written.append("chat_template.jinja")
    return written
