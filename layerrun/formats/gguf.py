"""Importing GGUF files (llama.cpp's format): config, tensors and tokenizer.

A GGUF file is one self-describing blob: metadata under llama.cpp's key names,
a tensor table, and the tensor data (quantized in blocks, or plain floats).
:class:`GGUFSource` presents it as a :class:`~layerrun.formats.source.ModelSource`
under Hugging Face names, so the converter treats it like a HF folder.
Architectures: ``llama`` (Llama, SmolLM, Mistral-style files), ``qwen2``,
``qwen3``, ``gemma2``, ``gemma3`` (text); others fail with one line naming them.

- **Header**: parsed here with ``struct`` (about 100 lines); ``gguf.GGUFReader``
  builds a numpy object per metadata element, which takes 14 s and 750 MB for a
  262k-token vocabulary, against well under a second here.
- **Tensors**: one at a time, read with ``pread`` (never a memory map of the
  whole file, so resident memory stays at one tensor) and dequantized to float32
  in row chunks with ``gguf.quants.dequantize``, the numpy reference of the
  ``gguf`` package maintained in llama.cpp. F16 and BF16 tensors keep their
  dtype. Verified against an independent implementation (transformers' torch
  dequantizer) or a quantize round trip in the tests: F32, F16, BF16, Q8_0,
  Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K. The other types gguf-py
  dequantizes (IQ*, TQ*, MXFP4) pass through it as-is.
- **llama.cpp's changes, undone**: its converter permutes the rows of q_proj and
  k_proj for the ``llama`` architecture (to pair RoPE dimensions its own way), and
  stores Gemma's RMSNorm weights as ``w + 1``. Both are reversed exactly as
  transformers' GGUF loader does, so weights and logits match it.
- **Tokenizer**: ``tokenizer.json`` is built with the ``tokenizers`` library
  directly, porting transformers' GGUF tokenizer conversion
  (``transformers/integrations/gguf/gguf_tokenizer_mapping.py`` and the
  GPT2/Llama/Gemma tokenizer classes it hands off to). Chosen over calling
  transformers at conversion time because the port is under 200 lines and keeps
  transformers a test-only dependency; the tests check that both give the same
  ids on a fixed set of strings.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import torch

from layerrun.errors import FormatError, UnsupportedModelError

# ---- the file: header, metadata, tensor table -----------------------------

GGUF_MAGIC = b"GGUF"
_KV_FORMAT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_KV_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9

F32, F16, BF16 = 0, 1, 30
_PLAIN = {F32: (np.float32, torch.float32), F16: (np.float16, torch.float16), BF16: (np.int16, torch.bfloat16)}
_CHUNK_BYTES = 16 << 20  # quantized tensors are read and dequantized this many bytes at a time


def _ggml_types() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, elements per block, bytes per block), from the gguf package."""
    import gguf

    return {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}


def _dequantizable() -> set[int]:
    import gguf.quants

    return {F32, F16, BF16} | {int(t) for t in gguf.quants._type_traits}


@dataclass(frozen=True)
class TensorInfo:
    name: str  # the GGUF name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]  # torch order: (rows, columns)
    ggml_type: int
    type_name: str
    offset: int  # absolute offset of the data in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    file_bytes: int

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    def arch_key(self, key: str, default=None):
        return self.metadata.get(f"{self.architecture}.{key}", default)


def read_header(path: str | Path) -> GGUFHeader:
    """Parse the metadata and the tensor table; reads no tensor data. Any damage is a FormatError."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    size = path.stat().st_size
    if size < 24:
        raise FormatError(f"{path}: not a GGUF file ({size} bytes, too short for a GGUF header)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != GGUF_MAGIC:
            raise FormatError(f"{path}: not a GGUF file (starts with {bytes(mm[:4])!r}, expected b'GGUF')")
        try:
            return _parse(path, mm, size)
        except (struct.error, IndexError, ValueError) as e:
            raise FormatError(f"{path}: truncated or corrupt GGUF header ({e}); download the file again") from None


def _parse(path: Path, mm: mmap.mmap, size: int) -> GGUFHeader:
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
    if version not in (2, 3):
        raise FormatError(f"{path}: GGUF version {version} is not supported (supported: 2, 3)")
    pos = 24

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", mm, p)
        if p + 8 + n > size:
            raise ValueError(f"a string runs past the end of the file at offset {p}")
        return mm[p + 8 : p + 8 + n].decode("utf-8"), p + 8 + n

    def value(p: int, vtype: int):
        if vtype in _KV_FORMAT:
            fmt = "<" + _KV_FORMAT[vtype]
            return struct.unpack_from(fmt, mm, p)[0], p + struct.calcsize(fmt)
        if vtype == _STRING:
            return string(p)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", mm, p)
            p += 12
            if etype in _KV_NUMPY:
                dt = np.dtype(_KV_NUMPY[etype]).newbyteorder("<")
                end = p + count * dt.itemsize
                if end > size:
                    raise ValueError(f"an array runs past the end of the file at offset {p}")
                return np.frombuffer(mm[p:end], dtype=dt).tolist(), end
            out = []
            for _ in range(count):
                v, p = value(p, etype)
                out.append(v)
            return out, p
        raise ValueError(f"unknown metadata value type {vtype} at offset {p}")

    metadata: dict = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", mm, pos)
        metadata[key], pos = value(pos + 4, vtype)

    types = _ggml_types()
    table = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (ndim,) = struct.unpack_from("<I", mm, pos)
        dims = struct.unpack_from(f"<{ndim}Q", mm, pos + 4)
        ggml_type, rel = struct.unpack_from("<IQ", mm, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        table.append((name, tuple(int(d) for d in reversed(dims)), int(ggml_type), int(rel)))

    align = int(metadata.get("general.alignment", 32))
    data_start = (pos + align - 1) // align * align
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, rel in table:
        tname, block, block_bytes = types.get(ggml_type, (f"type{ggml_type}", 1, 0))
        n = prod(shape)
        nbytes = n // block * block_bytes
        tensors[name] = TensorInfo(name, shape, ggml_type, tname, data_start + rel, nbytes)
    header = GGUFHeader(path, version, metadata, tensors, size)
    short = [t.name for t in tensors.values() if t.offset + t.nbytes > size]
    if short:
        raise FormatError(
            f"{path}: truncated GGUF file ({size} bytes): the data of {len(short)} tensor(s) runs past the end "
            f"(first: {short[0]}); download the file again"
        )
    return header


class GGUFFile:
    """An open GGUF file: its header, and its tensors read one at a time by GGUF name, in the file's layout."""

    def __init__(self, path: str | Path):
        self._fd: int | None = None
        self.path = Path(path)
        self.header = read_header(self.path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, name: str) -> torch.Tensor:
        """One tensor: F16/BF16/F32 as stored, anything quantized dequantized to float32."""
        t = self.header.tensors[name]
        if t.ggml_type in _PLAIN:
            np_dtype, torch_dtype = _PLAIN[t.ggml_type]
            buf = self._pread(t.offset, t.nbytes)
            return torch.from_numpy(buf.view(np_dtype)).view(torch_dtype).reshape(t.shape)
        if t.ggml_type not in _dequantizable():
            raise UnsupportedModelError(
                f"{self.path.name}: tensor {name} has type {t.type_name}, which is not supported"
            )
        import gguf.quants

        cols = t.shape[-1]
        rows = prod(t.shape[:-1])
        row_bytes = t.nbytes // rows
        out = np.empty((rows, cols), dtype=np.float32)
        step = max(1, _CHUNK_BYTES // row_bytes)
        for r in range(0, rows, step):  # chunks keep gguf-py's temporaries small
            n = min(step, rows - r)
            raw = self._pread(t.offset + r * row_bytes, n * row_bytes).reshape(n, row_bytes)
            out[r : r + n] = gguf.quants.dequantize(raw, t.ggml_type)
        return torch.from_numpy(out).reshape(t.shape)

    def _pread(self, offset: int, nbytes: int) -> np.ndarray:
        if self._fd is None:
            raise FormatError(f"{self.path}: file is closed")
        buf = np.empty(nbytes, dtype=np.uint8)
        view, done = memoryview(buf), 0
        while done < nbytes:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                raise FormatError(f"{self.path}: file ended early at byte {offset + done}; download it again")
            done += n
        return buf

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


# ---- architectures -----------------------------------------------------------

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 2/3 wrap attention and MLP in norms; llama.cpp's ffn_norm is the *pre*-feedforward one there.
_GEMMA_LAYER = {
    **_LLAMA_LAYER,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


@dataclass(frozen=True)
class _Arch:
    model_type: str
    layer_names: dict[str, str]
    permute_qk: bool = False  # llama.cpp permutes q/k rows for its `llama` architecture only
    norm_plus_one: bool = False  # Gemma's RMSNorm weights are stored as w + 1


ARCHS = {
    "llama": _Arch("llama", _LLAMA_LAYER, permute_qk=True),
    "qwen2": _Arch("qwen2", _LLAMA_LAYER),
    "qwen3": _Arch("qwen3", _LLAMA_LAYER),
    "gemma2": _Arch("gemma2", _GEMMA_LAYER, norm_plus_one=True),
    "gemma3": _Arch("gemma3_text", _GEMMA_LAYER, norm_plus_one=True),
}
_NAME_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")


def _hf_name(arch: _Arch, gguf_name: str) -> str | None:
    m = _NAME_RE.match(gguf_name)
    if m:
        leaf = arch.layer_names.get(m.group(2))
        return f"model.layers.{m.group(1)}.{leaf}.{m.group(3)}" if leaf else None
    stem, _, suffix = gguf_name.rpartition(".")
    return f"{_TOP[stem]}.{suffix}" if stem in _TOP else None


def _rope_scaling(h: GGUFHeader) -> dict | None:
    kind = h.arch_key("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(h.arch_key("rope.scaling.factor"))}
    raise UnsupportedModelError(f"{h.path.name}: RoPE scaling {kind!r} is not supported yet (supported: linear)")


def build_config(h: GGUFHeader) -> dict:
    """A Hugging Face ``config.json`` dict from the metadata, with the values transformers' GGUF loader gives."""
    arch = h.architecture
    spec = ARCHS[arch]
    k = h.arch_key
    n_heads = int(k("attention.head_count"))
    hidden = int(k("embedding_length"))
    kv = k("attention.head_count_kv", n_heads)
    if isinstance(kv, list):
        raise UnsupportedModelError(f"{h.path.name}: per-layer key/value head counts are not supported")
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    head_dim = k("attention.key_length") or (k("rope.dimension_count") if arch == "llama" else None)
    cfg = {
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(k("feed_forward_length")),
        "num_hidden_layers": int(k("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(kv),
        "head_dim": int(head_dim or hidden // n_heads),
        "rms_norm_eps": float(k("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(k("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(k("context_length", 2048)),
        "vocab_size": int(k("vocab_size") or (len(tokens) if tokens else 0)),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in h.tensors,
    }
    for ours, key in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in h.metadata:
            cfg[ours] = int(h.metadata[f"tokenizer.ggml.{key}"])
    scaling = _rope_scaling(h)
    if arch in ("gemma2", "gemma3"):
        n_layers = cfg["num_hidden_layers"]
        # llama.cpp scales queries by 1/sqrt(hidden/heads) for the 27B models, by 1/sqrt(head_dim) otherwise
        big = (arch, n_layers) in (("gemma2", 46), ("gemma3", 62))
        cfg.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=hidden // n_heads if big else cfg["head_dim"],
            sliding_window=int(k("attention.sliding_window", 4096)),
        )
    if arch == "gemma2":
        cfg.update(
            attn_logit_softcapping=float(k("attn_logit_softcapping", 50.0)),
            final_logit_softcapping=float(k("final_logit_softcapping", 30.0)),
        )
    if arch == "gemma3":
        pattern = k("attention.sliding_window_pattern", 6)  # every N-th layer global, or one flag per layer
        if isinstance(pattern, list):
            sliding = [bool(x) for x in pattern]
        else:
            sliding = [(i + 1) % int(pattern) != 0 for i in range(n_layers)]
            cfg["sliding_window_pattern"] = int(pattern)
        local_theta = 10000.0  # llama.cpp's fixed RoPE base for Gemma 3's sliding layers
        cfg.update(
            rope_local_base_freq=local_theta,
            layer_types=["sliding_attention" if x else "full_attention" for x in sliding],
            final_logit_softcapping=None,
            attn_logit_softcapping=None,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
                "full_attention": scaling | {"rope_theta": cfg["rope_theta"]}
                if scaling
                else {"rope_type": "default", "rope_theta": cfg["rope_theta"]},
            },
        )
    else:  # transformers 5 spelling, beside the flat rope_theta / rope_scaling older readers use
        cfg["rope_parameters"] = (scaling or {"rope_type": "default"}) | {"rope_theta": cfg["rope_theta"]}
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


# ---- the source --------------------------------------------------------------


class GGUFSource:
    """A GGUF file as a model source: Hugging Face names, one dequantized tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header = h = read_header(self.path)
        self.file: GGUFFile | None = None
        arch = h.architecture
        if arch not in ARCHS:
            raise UnsupportedModelError(
                f"{self.path.name}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
            )
        self.arch = ARCHS[arch]
        ok = _dequantizable()
        bad = Counter(t.type_name for t in h.tensors.values() if t.ggml_type not in ok)
        if bad:
            listed = ", ".join(f"{n} ({c} tensors)" for n, c in sorted(bad.items()))
            raise UnsupportedModelError(f"{self.path.name}: tensor type(s) not supported: {listed}")
        self._by_hf: dict[str, TensorInfo] = {}
        unknown = []
        for t in h.tensors.values():
            hf = _hf_name(self.arch, t.name)
            if hf is None:
                unknown.append(t.name)
            else:
                self._by_hf[hf] = t
        if unknown:
            hint = " (Llama 3.1-style RoPE frequency factors)" if "rope_freqs.weight" in unknown else ""
            raise UnsupportedModelError(
                f"{self.path.name}: GGUF tensor(s) with no known Hugging Face name for {arch!r}{hint}: "
                + ", ".join(sorted(unknown)[:8])
                + (" …" if len(unknown) > 8 else "")
            )
        kind = h.metadata.get("tokenizer.ggml.model")
        if "tokenizer.ggml.tokens" in h.metadata and kind not in TOKENIZER_KINDS:
            raise UnsupportedModelError(
                f"{self.path.name}: GGUF tokenizer {kind!r} is not supported; supported: {', '.join(TOKENIZER_KINDS)}"
            )
        self.config = build_config(h)
        self.file = GGUFFile(self.path)

    # ---- ModelSource -------------------------------------------------------
    def description(self) -> dict:
        return {
            "kind": "gguf",
            "path": str(self.path.resolve()),
            "architecture": self.header.architecture,
            "name": self.header.metadata.get("general.name"),
            "tensor_types": dict(sorted(Counter(t.type_name for t in self.header.tensors.values()).items())),
            "bytes": self.header.file_bytes,
        }

    def fingerprint(self) -> str:
        st = self.path.stat()
        return hashlib.sha256(f"{self.path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]

    def tensor_names(self) -> list[str]:
        return sorted(self._by_hf)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._by_hf[name].shape

    def tensor_dtype(self, name: str) -> torch.dtype:
        t = self._by_hf[name]
        if t.ggml_type in (F16, BF16) and not self._offset_norm(name):
            return _PLAIN[t.ggml_type][1]
        return torch.float32

    def _offset_norm(self, name: str) -> bool:
        return self.arch.norm_plus_one and name.endswith("norm.weight")

    def get(self, name: str) -> torch.Tensor:
        if self.file is None:
            raise FormatError(f"{self.path}: source is closed")
        x = self.file.read(self._by_hf[name].name)
        if self._offset_norm(name):
            x = x.float() - 1.0  # in float32, as transformers does, so precision near 1.0 is kept
        if self.arch.permute_qk and (".q_proj." in name or ".k_proj." in name):
            n = self.config["num_attention_heads"] if ".q_proj." in name else self.config["num_key_value_heads"]
            x = _unpermute(x, n)
        return x

    def write_aux_files(self, dst: Path) -> list[str]:
        """tokenizer.json, tokenizer_config.json, chat_template.jinja (if any), generation_config.json, config.json."""
        dst = Path(dst)
        written = []
        if "tokenizer.ggml.tokens" in self.header.metadata:
            tok, tok_cfg, template = build_tokenizer(self.header)
            tok.save(str(dst / "tokenizer.json"))
            (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
            written += ["tokenizer.json", "tokenizer_config.json"]
            if template:
                (dst / "chat_template.jinja").write_text(template)
                written.append("chat_template.jinja")
        gen = {k: self.config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in self.config}
        if gen:
            (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            written.append("generation_config.json")
        (dst / "config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        written.append("config.json")
        return written

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (transformers' ``_reverse_permute_weights``)."""
    shape = w.shape
    w = w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:])  # (heads, D/2, 2, ...) as llama.cpp stored it
    return w.transpose(1, 2).reshape(shape).contiguous()  # (heads, 2, D/2, ...): HF's rotate-half layout


# ---- tokenizer -----------------------------------------------------------------

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


def build_tokenizer(h: GGUFHeader):
    """(tokenizers.Tokenizer, tokenizer_config dict, chat template or None) for the file's vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    meta = h.metadata
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
        gemma = h.architecture.startswith("gemma")
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
            f"{h.path.name}: GGUF tokenizer {kind!r} is not supported; supported: {', '.join(TOKENIZER_KINDS)}"
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
        "model_max_length": int(h.arch_key("context_length", 2048)),
    }
    return tok, config, meta.get("tokenizer.chat_template")


# ---- inspect -------------------------------------------------------------------


def inspect_gguf(path: str | Path) -> dict:
    """A summary of a GGUF file for ``layerrun inspect``: architecture, shapes, tensor types, tokenizer."""
    h = read_header(path)
    meta = h.metadata
    k = h.arch_key
    by_type: dict[str, dict[str, int]] = {}
    for t in h.tensors.values():
        e = by_type.setdefault(t.type_name, {"count": 0, "bytes": 0})
        e["count"] += 1
        e["bytes"] += t.nbytes
    ok = _dequantizable()
    problems = []
    if h.architecture not in ARCHS:
        problems.append(f"architecture {h.architecture!r} is not supported")
    bad = sorted({t.type_name for t in h.tensors.values() if t.ggml_type not in ok})
    if bad:
        problems.append(f"tensor type(s) not supported: {', '.join(bad)}")
    tokens = meta.get("tokenizer.ggml.tokens")
    file_type = meta.get("general.file_type")
    return {
        "path": str(Path(path).resolve()),
        "format": "gguf",
        "gguf_version": h.version,
        "name": meta.get("general.name"),
        "architecture": h.architecture,
        "model_type": ARCHS[h.architecture].model_type if h.architecture in ARCHS else None,
        "supported": not problems,
        "problems": problems,
        "file_type": _FILE_TYPES.get(file_type, file_type),
        "num_layers": k("block_count"),
        "context_length": k("context_length"),
        "hidden_size": k("embedding_length"),
        "intermediate_size": k("feed_forward_length"),
        "num_attention_heads": k("attention.head_count"),
        "num_key_value_heads": k("attention.head_count_kv"),
        "vocab_size": k("vocab_size") or (len(tokens) if tokens else None),
        "parameters": sum(prod(t.shape) for t in h.tensors.values()),
        "tensor_count": len(h.tensors),
        "tensor_bytes": sum(t.nbytes for t in h.tensors.values()),
        "file_bytes": h.file_bytes,
        "tensor_types": dict(sorted(by_type.items())),
        "tied_embeddings": "output.weight" not in h.tensors,
        "tokenizer": meta.get("tokenizer.ggml.model"),
        "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
        "chat_template": bool(meta.get("tokenizer.chat_template")),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


# llama.cpp's `general.file_type` (enum llama_ftype), for display.
_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}
