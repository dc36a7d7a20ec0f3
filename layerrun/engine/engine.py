"""The engine: loads a layered model and generates, streaming layers from disk.

``Engine.stream`` is a step generator yielding :class:`Chunk` objects as tokens
arrive; ``Engine.generate`` collects them into a :class:`Generation`;
``Engine.logits`` runs a plain forward pass for validation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerrun.engine.kv_cache import KVCache
from layerrun.engine.sampling import SamplingParams, make_sampler
from layerrun.engine.telemetry import GenerationStats, peak_rss_bytes
from layerrun.engine.tokenizer import StreamDecoder, Tokenizer
from layerrun.errors import FormatError, LayerRunError
from layerrun.formats.convert import DTYPES
from layerrun.formats.manifest import Manifest
from layerrun.io.reader import FileReader, aligned_empty
from layerrun.models import build_model

MODES = ("stream", "full")
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class Chunk:
    """One streamed piece of output: the new text (may be empty while UTF-8 is incomplete)."""

    text: str
    token_id: int | None
    index: int
    finish_reason: str | None = None
    stats: GenerationStats | None = None


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    prompt_token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


def resolve_model_path(path: str | Path) -> Path:
    """A folder path, or the name of a model in the local store."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    try:
        from layerrun.formats.store import resolve_name
    except ImportError:
        resolve_name = None
    if resolve_name is not None:
        found = resolve_name(str(path))
        if found is not None:
            return found
    raise FormatError(f"{path}: no such model folder (nor a model name in the local store; see `layerrun list`)")


class Engine:
    """A loaded layered model.

    Options: ``mode`` ("stream": one layer at a time from disk; "full": every
    layer loaded once and kept), ``reader`` ("pread", "direct", "mmap"),
    ``dtype`` (compute dtype; default: the stored dtype, float16 -> float32 on
    CPU), ``verify`` (check each file's sha256 before use).
    """

    def __init__(
        self,
        path: str | Path,
        mode: str = "stream",
        reader: str = "pread",
        dtype: str | None = None,
        device: str = "cpu",
        verify: bool = False,
    ):
        self.path = resolve_model_path(path)
        self.manifest = Manifest.read(self.path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise FormatError(f"{self.path}: config.json is missing")
        self.config = json.loads(cfg_path.read_text())
        self.model = build_model(self.config)
        self.args = self.model.args
        if self.manifest.num_layers != self.args.num_hidden_layers:
            raise FormatError(
                f"{self.path}: manifest has {self.manifest.num_layers} layers, config.json says {self.args.num_hidden_layers}"
            )
        if mode not in MODES:
            raise LayerRunError(f"mode {mode!r} is not one of: {', '.join(MODES)}")
        if device not in ("cpu", "auto"):
            raise LayerRunError(f"device {device!r} is not supported yet (supported: cpu)")
        self.device = torch.device("cpu")
        self.mode = mode
        stored = DTYPES.get(self.manifest.dtype, torch.float32)
        notes = []
        if dtype is None:
            self.dtype = stored
            if stored == torch.float16 and self.device.type == "cpu":
                self.dtype = torch.float32
                notes.append("float16 weights are computed in float32 on CPU")
        else:
            if dtype not in DTYPES:
                raise LayerRunError(f"dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
            self.dtype = DTYPES[dtype]
        self.notes = notes
        if verify:
            from layerrun.formats.validate import validate_folder

            problems = validate_folder(self.path, check_sha=True)
            if problems:
                raise FormatError(f"{self.path}: " + "; ".join(problems))
        self.reader = FileReader(self.path, reader)
        self._tokenizer: Tokenizer | None = None
        self._tok_error: Exception | None = None

        # Embeddings and final norm/head are small next to the layers and used every step.
        self.embeddings = self._load_resident(self.manifest.embeddings)
        self.final = self._load_resident(self.manifest.final)
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        self._slot = aligned_empty(self.manifest.max_layer_bytes)
        if mode == "full":
            for i in range(self.manifest.num_layers):
                self._resident[i] = self._load_resident(self.manifest.layer(i))

    # ---- weights ---------------------------------------------------------
    def _cast(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.to(self.dtype) if v.is_floating_point() and v.dtype != self.dtype else v) for k, v in w.items()}

    def _load_resident(self, entry) -> dict[str, torch.Tensor]:
        w, _ = self.reader.read(entry)
        return self.model.sanitize(self._cast(w))

    def _layer_weights(self, i: int, stats: GenerationStats) -> dict[str, torch.Tensor]:
        if i in self._resident:
            return self._resident[i]
        w, rs = self.reader.read(self.manifest.layer(i), self._slot)
        stats.bytes_read += rs.bytes
        stats.read_s += rs.end - rs.start
        return self.model.sanitize(self._cast(w))

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.path)
        return self._tokenizer

    # ---- forward ---------------------------------------------------------
    @torch.inference_mode()
    def _forward(
        self,
        ids: torch.Tensor,
        cache: KVCache | None,
        positions: torch.Tensor,
        key_valid: torch.Tensor | None,
        stats: GenerationStats,
        last_only: bool,
    ) -> torch.Tensor:
        past = cache.length if cache is not None else 0
        x = self.model.embed(self.embeddings, ids)
        ctx = self.model.prepare(positions, key_valid, past + ids.shape[1], self.dtype)
        for i in range(self.args.num_hidden_layers):
            w = self._layer_weights(i, stats)
            t0 = time.perf_counter()
            x = self.model.layer(i, w, x, cache[i] if cache is not None else None, ctx)
            stats.compute_s += time.perf_counter() - t0
        if last_only:
            x = x[:, -1:]
        t0 = time.perf_counter()
        out = self.model.head(self.final, x, self.embeddings).float()
        stats.compute_s += time.perf_counter() - t0
        return out

    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Logits (batch, seq, vocab) in float32 for every position; rows may be left-padded."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        self._check_ids(ids)
        if attention_mask is None:
            positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
            key_valid = None
        else:
            key_valid = torch.as_tensor(attention_mask).bool()
            positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
        return self._forward(ids, None, positions, key_valid, GenerationStats(), last_only=False)

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.args.vocab_size):
            raise LayerRunError(f"token ids must be in [0, {self.args.vocab_size}); got {ids.min()}..{ids.max()}")

    # ---- prompts ----------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        try:
            return bool(self.tokenizer.chat_template)
        except FormatError:
            return False

    def encode_prompt(self, prompt, chat: bool | None = None, system: str | None = None) -> list[int]:
        """Token ids for a string (chat template applied when the model has one, unless chat=False),
        a list of chat messages, or a list of ids (used as-is)."""
        if isinstance(prompt, str):
            use_chat = self.has_chat_template if chat is None else chat
            if use_chat:
                msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
                return self.tokenizer.encode_chat(msgs)
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode_chat(list(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.reshape(-1).tolist()
        ids = [int(i) for i in prompt]
        self._check_ids(torch.tensor(ids, dtype=torch.long))
        return ids

    # ---- generation -------------------------------------------------------
    def stream(
        self,
        prompt,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        chat: bool | None = None,
        system: str | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[Chunk]:
        """Yield chunks as tokens are generated; the last chunk carries finish_reason and stats."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        sampler = make_sampler(params)
        if max_new_tokens < 1:
            raise LayerRunError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_ids = self.encode_prompt(prompt, chat=chat, system=system)
        if not prompt_ids:
            raise LayerRunError("the prompt is empty")
        ctx_len = self.args.max_position_embeddings
        if len(prompt_ids) >= ctx_len:
            raise LayerRunError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {ctx_len}")
        max_new = min(max_new_tokens, ctx_len - len(prompt_ids))
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        text_mode = self._tokenizer is not None or (self.path / "tokenizer.json").is_file()
        decoder = StreamDecoder(self.tokenizer) if text_mode else None
        eos = set() if ignore_eos or not text_mode else self.tokenizer.eos_token_ids
        if not text_mode:
            eos = set() if ignore_eos else _config_eos(self.config)

        stats = GenerationStats(
            prompt_tokens=len(prompt_ids), mode=self.mode, reader=self.reader.backend,
            device=str(self.device), dtype=str(self.dtype).replace("torch.", ""), notes=list(self.notes),
        )
        cache = KVCache(self.args.num_hidden_layers)
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        positions = torch.arange(len(prompt_ids))[None]
        held = ""  # text not yet emitted because it may begin a stop string
        emitted = ""
        t0 = time.perf_counter()
        logits = self._forward(ids, cache, positions, None, stats, last_only=True)
        stats.prefill_s = time.perf_counter() - t0
        t_decode = time.perf_counter()
        finish = "length"
        stop_hit = False
        for n in range(max_new):
            tok = int(sampler(logits[:, -1])[0])
            stats.generated_tokens += 1
            if tok in eos:
                finish = "stop"
                break
            piece = decoder.push(tok) if decoder else ""
            held += piece
            out, hit = _split_stop(held, stops)
            if hit:
                emitted += out
                yield Chunk(out, tok, n)
                finish, stop_hit = "stop", True
                break
            emitted += out
            held = held[len(out) :]
            yield Chunk(out, tok, n)
            if n + 1 == max_new:
                break
            pos = torch.tensor([[len(prompt_ids) + n]])
            logits = self._forward(torch.tensor([[tok]]), cache, pos, None, stats, last_only=True)
        tail = ""
        if not stop_hit:
            # Emit what was held back for a possible stop string, and any incomplete UTF-8 tail.
            held += decoder.flush() if decoder else ""
            tail, _ = _split_stop(held, stops)
            if not _:
                tail = held
        stats.decode_s = time.perf_counter() - t_decode
        stats.peak_rss_bytes = peak_rss_bytes()
        if self.reader.fallback_note and self.reader.fallback_note not in stats.notes:
            stats.notes.append(self.reader.fallback_note)
        yield Chunk(tail, None, stats.generated_tokens, finish_reason=finish, stats=stats)

    def generate(self, prompt, **kwargs) -> Generation:
        """Generate to completion; returns text, token ids, finish reason and stats."""
        text, ids = [], []
        for c in self.stream(prompt, **kwargs):
            text.append(c.text)
            if c.token_id is not None:
                ids.append(c.token_id)
            if c.finish_reason:
                return Generation("".join(text), ids, c.finish_reason, c.stats)
        raise RuntimeError("stream ended without a final chunk")  # unreachable

    def close(self) -> None:
        self.reader.close()
        self._resident.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _config_eos(config: dict) -> set[int]:
    v = config.get("eos_token_id")
    if isinstance(v, int):
        return {v}
    if isinstance(v, list):
        return {int(x) for x in v}
    return set()


def _split_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text safe to emit, whether a stop string was hit). On a hit, the text before it.

    Without a hit, holds back the longest suffix that could begin a stop string.
    """
    if not stops:
        return text, False
    first = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (first is None or i < first):
            first = i
    if first is not None:
        return text[:first], True
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return text[: len(text) - keep], False
