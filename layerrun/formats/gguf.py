"""Importing GGUF files (llama.cpp's format): config, tensors and tokenizer.

A GGUF file is one self-describing blob: metadata under llama.cpp's key names,
a tensor table, and the tensor data (quantized in blocks, or plain floats).
:class:`GGUFSource` presents it as a :class:`~layerrun.formats.source.ModelSource`
under Hugging Face names, so the converter treats it like a HF folder.
Architectures: ``llama`` (Llama, SmolLM, Mistral-style files; Mixtral when
``llama.expert_count`` is set), ``qwen2``, ``qwen3``, ``qwen3moe``, ``gemma2``,
``gemma3`` (text); others fail with one line naming them.

- **Header**: parsed with ``struct`` in :mod:`layerrun.formats.gguf_header`, which
  also checks everything in it (counts against the file size, nesting, duplicate
  names, alignment, overlaps, the model keys' types); ``gguf.GGUFReader``
  builds a numpy object per metadata element, which takes 14 s and 750 MB for a
  262k-token vocabulary, against well under a second here.
- **Tensors**: one at a time, read with ``pread`` (never a memory map of the
  whole file, so resident memory stays at one tensor) and dequantized to float32
  in row chunks with ``gguf.quants.dequantize``, the numpy reference of the
  ``gguf`` package maintained in llama.cpp. F16 and BF16 tensors keep their
  dtype. Asked for another dtype (``GGUFSource.get(name, dtype)``, as the
  converter does), each chunk is cast straight into an output of that dtype, so
  a bf16 conversion never holds a whole matrix in float32 (same bits as a cast
  of the whole). Verified against an independent implementation (transformers'
  torch dequantizer) or a quantize round trip in the tests: F32, F16, BF16,
  Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K. The other types
  gguf-py dequantizes (IQ*, TQ*, MXFP4) pass through it as-is.
- **Experts**: llama.cpp stacks each layer's experts into 3-D tensors
  (``blk.N.ffn_{gate,up,down}_exps.weight``, numpy shape (experts, rows, columns));
  they are presented as the checkpoints' per-expert tensors (Qwen 3 MoE's
  ``mlp.experts.J.gate_proj``, Mixtral's ``block_sparse_moe.experts.J.w1``), each read
  as its own slice: quant blocks run along rows, so expert J is one contiguous byte
  range, and only it is read and dequantized (a Qwen3-30B-A3B fused tensor holds 128
  experts, ~200M parameters). Older Mixtral files with one tensor per expert
  (``blk.N.ffn_gate.J.weight``) map directly. Routers: ``ffn_gate_inp``.
- **llama.cpp's changes, undone**: its converter permutes the rows of q_proj and
  k_proj for the ``llama`` architecture (to pair RoPE dimensions its own way), and
  stores Gemma's RMSNorm weights as ``w + 1``. Both are reversed exactly as
  transformers' GGUF loader does, so weights and logits match it.
- **Tokenizer**: ``tokenizer.json`` is built from the ``tokenizer.ggml.*``
  metadata by :mod:`layerrun.formats.gguf_tokenizer` (a port of transformers'
  GGUF tokenizer conversion); :class:`GGUFSource` checks the kind when it opens
  the file and writes the files in :meth:`GGUFSource.write_aux_files`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import torch

from layerrun.errors import FormatError, UnsupportedModelError
from layerrun.formats.files import open_user_file
from layerrun.formats.gguf_header import (  # noqa: F401  (read_header and the types: re-exported)
    GGUF_MAGIC,
    GGUFHeader,
    TensorInfo,
    _ggml_types,
    _is_int,
    check_metadata,
    read_header,
)
from layerrun.formats.gguf_tokenizer import (  # noqa: F401  (TOKENIZER_KINDS: re-exported for older importers)
    TOKENIZER_KINDS,
    check_tokenizer,
    tokenizer_from_metadata,
    write_tokenizer_files,
)
from layerrun.formats.source import row_chunks

# ---- the file: tensors ------------------------------------------------------------

F32, F16, BF16 = 0, 1, 30
_PLAIN = {F32: (np.float32, torch.float32), F16: (np.float16, torch.float16), BF16: (np.int16, torch.bfloat16)}
_CHUNK_BYTES = 4 << 20  # stored bytes read and dequantized (or cast) at a time; bounds the float32 temporaries


def _dequantizable() -> set[int]:
    import gguf.quants

    return {F32, F16, BF16} | {int(t) for t in gguf.quants._type_traits}


class GGUFFile:
    """An open GGUF file: its header, and its tensors read one at a time by GGUF name, in the file's layout."""

    def __init__(self, path: str | Path):
        self._fd: int | None = None
        self.path = Path(path)
        self.header = read_header(self.path)
        self._fd, _ = open_user_file(self.path, "GGUF file")

    def read(self, name: str, dtype: torch.dtype | None = None, index: int | None = None) -> torch.Tensor:
        """One tensor: F16/BF16/F32 as stored, anything quantized dequantized to float32.

        With ``dtype``, the tensor comes back in that dtype, converted one row chunk at a
        time into the output, so a matrix is never held whole at the stored (or float32)
        precision; a vector is read whole and cast. The values are the same, bit for bit,
        as ``read(name).to(dtype)``: each element is the same float32 (or stored-dtype)
        value, cast once.

        With ``index``, only ``read(name)[index]`` is read: one slice along the first dimension,
        such as one expert of llama.cpp's fused (experts, rows, columns) tensors. Quant blocks run
        along rows and a slice is whole rows, so it is one contiguous byte range of the tensor;
        only that range is read and dequantized, bit for bit what slicing the whole would give.
        """
        t = self.header.tensors[name]
        shape, offset, nbytes = t.shape, t.offset, t.nbytes
        if index is not None:
            if len(shape) < 2 or not 0 <= index < shape[0]:
                raise IndexError(f"{self.path.name}: {name} has shape {list(shape)}; no slice {index} along dim 0")
            nbytes //= shape[0]  # whole rows of whole blocks per slice: exact
            offset += index * nbytes
            shape = shape[1:]
        rows = prod(shape[:-1])  # 1 for a vector
        row_bytes = nbytes // rows if rows else 0
        if t.ggml_type in _PLAIN:
            np_dtype, torch_dtype = _PLAIN[t.ggml_type]

            def plain(buf: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(buf.view(np_dtype)).view(torch_dtype)

            if dtype is None or dtype == torch_dtype or rows <= 1:  # as stored, or a vector (small): whole
                x = plain(self._pread(offset, nbytes)).reshape(shape)
                return x if dtype is None else x.to(dtype)
            out = torch.empty((rows, shape[-1]), dtype=dtype)
            for r, n in self._row_chunks(rows, row_bytes):
                out[r : r + n] = plain(self._pread(offset + r * row_bytes, n * row_bytes)).reshape(n, -1)
            return out.reshape(shape)
        if t.ggml_type not in _dequantizable():
            raise UnsupportedModelError(
                f"{self.path.name}: tensor {name} has type {t.type_name}, which is not supported"
            )
        import gguf.quants

        out = torch.empty((rows, shape[-1]), dtype=dtype or torch.float32)
        for r, n in self._row_chunks(rows, row_bytes):  # chunks keep gguf-py's temporaries small
            raw = self._pread(offset + r * row_bytes, n * row_bytes).reshape(n, row_bytes)
            out[r : r + n] = torch.from_numpy(gguf.quants.dequantize(raw, t.ggml_type))  # casts if dtype is set
        return out.reshape(shape)

    @staticmethod
    def _row_chunks(rows: int, row_bytes: int):
        """(first row, row count) for chunks of about ``_CHUNK_BYTES`` of stored data."""
        return row_chunks(rows, row_bytes, _CHUNK_BYTES)

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


# llama.cpp's routers and fused expert tensors; {j} is the expert index.
_QWEN3_MOE_LAYER = {**_LLAMA_LAYER, "ffn_gate_inp": "mlp.gate"}
_QWEN3_MOE_EXPERTS = {
    "ffn_gate_exps": "mlp.experts.{j}.gate_proj",
    "ffn_up_exps": "mlp.experts.{j}.up_proj",
    "ffn_down_exps": "mlp.experts.{j}.down_proj",
}
_MIXTRAL_LAYER = {**_LLAMA_LAYER, "ffn_gate_inp": "block_sparse_moe.gate"}
_MIXTRAL_EXPERTS = {
    "ffn_gate_exps": "block_sparse_moe.experts.{j}.w1",
    "ffn_up_exps": "block_sparse_moe.experts.{j}.w3",
    "ffn_down_exps": "block_sparse_moe.experts.{j}.w2",
}


@dataclass(frozen=True)
class _Arch:
    model_type: str
    layer_names: dict[str, str]
    permute_qk: bool = False  # llama.cpp permutes q/k rows for its `llama` architecture only
    norm_plus_one: bool = False  # Gemma's RMSNorm weights are stored as w + 1
    experts: dict[str, str] | None = None  # fused (experts, rows, cols) tensor stem -> per-expert HF leaf


ARCHS = {
    "llama": _Arch("llama", _LLAMA_LAYER, permute_qk=True),
    "qwen2": _Arch("qwen2", _LLAMA_LAYER),
    "qwen3": _Arch("qwen3", _LLAMA_LAYER),
    "qwen3moe": _Arch("qwen3_moe", _QWEN3_MOE_LAYER, experts=_QWEN3_MOE_EXPERTS),
    "gemma2": _Arch("gemma2", _GEMMA_LAYER, norm_plus_one=True),
    "gemma3": _Arch("gemma3_text", _GEMMA_LAYER, norm_plus_one=True),
}
# llama.cpp writes Mixtral as `llama` with `llama.expert_count` set (its converter handles both in one class)
MIXTRAL = _Arch("mixtral", _MIXTRAL_LAYER, permute_qk=True, experts=_MIXTRAL_EXPERTS)
_NAME_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")
# Mixtral files from before llama.cpp fused the experts (Dec 2023 - Mar 2024): one 2-D tensor per expert
_SPLIT_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")


def _expert_count(h: GGUFHeader) -> int:
    n = h.arch_key("expert_count", 0)
    return n if _is_int(n) and n > 0 else 0  # anything else: check_metadata names it


def arch_of(h: GGUFHeader) -> _Arch | None:
    """How the file maps to Hugging Face names, or None for an architecture not supported."""
    if not isinstance(h.architecture, str):
        return None
    if h.architecture == "llama" and _expert_count(h) > 0:
        return MIXTRAL
    return ARCHS.get(h.architecture)


def _hf_name(arch: _Arch, gguf_name: str) -> str | None:
    m = _NAME_RE.match(gguf_name)
    if m:
        leaf = arch.layer_names.get(m.group(2))
        return f"model.layers.{m.group(1)}.{leaf}.{m.group(3)}" if leaf else None
    stem, _, suffix = gguf_name.rpartition(".")
    return f"{_TOP[stem]}.{suffix}" if stem in _TOP else None


def _expert_names(arch: _Arch, t: TensorInfo) -> dict[str, int | None] | None:
    """HF name -> expert index (a slice of ``t``, or None for the whole of a split-expert tensor)
    for an expert tensor; None for any other tensor."""
    if not arch.experts:
        return None
    m = _NAME_RE.match(t.name)
    if m and m.group(3) == "weight" and m.group(2) in arch.experts:
        leaf = arch.experts[m.group(2)]
        n = t.shape[0] if len(t.shape) == 3 else 0
        return {f"model.layers.{m.group(1)}.{leaf.format(j=j)}.weight": j for j in range(n)} or None
    m = _SPLIT_EXPERT_RE.match(t.name)
    if m and len(t.shape) == 2:
        leaf = arch.experts[f"ffn_{m.group(2)}_exps"]
        return {f"model.layers.{m.group(1)}.{leaf.format(j=int(m.group(3)))}.weight": None}
    return None


def _rope_scaling(h: GGUFHeader) -> dict | None:
    kind = h.arch_key("rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(h.arch_key("rope.scaling.factor"))}
    raise UnsupportedModelError(f"{h.path.name}: RoPE scaling {kind!r} is not supported yet (supported: linear)")


def build_config(h: GGUFHeader) -> dict:
    """A Hugging Face ``config.json`` dict from the metadata, with the values transformers' GGUF loader gives."""
    check_metadata(h)
    arch = h.architecture
    spec = arch_of(h)
    k = h.arch_key
    n_heads = int(k("attention.head_count"))
    hidden = int(k("embedding_length"))
    kv = k("attention.head_count_kv", n_heads)
    if isinstance(kv, list):
        raise UnsupportedModelError(f"{h.path.name}: per-layer key/value head counts are not supported")
    tokens = h.metadata.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else None
    head_dim = k("attention.key_length") or (k("rope.dimension_count") if arch == "llama" else None)
    cfg = {
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(k("feed_forward_length") or k("expert_feed_forward_length")),
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
    if spec.experts:
        cfg.update(_moe_config(h, spec))
    return cfg


def _moe_config(h: GGUFHeader, spec: _Arch) -> dict:
    """The expert fields of the config, under the names the family's HF config uses.

    The expert width is ``expert_feed_forward_length`` where llama.cpp writes it (Qwen 3 MoE;
    transformers' GGUF loader does not read it and keeps its class default, 768), else the rows of
    the first layer's gate experts. Qwen 3 MoE renormalises the top-k routing weights: llama.cpp's
    converter writes no key for it, its ``qwen3moe`` graph hard-codes the renormalisation and
    transformers' loader sets ``norm_topk_prob=True`` for the architecture. A file that states
    ``qwen3moe.expert_weights_norm`` (llama.cpp's key for it in other MoE architectures) is taken
    at its word. Mixtral always renormalises.
    """
    k = h.arch_key
    n_exp = _expert_count(h)
    used = k("expert_used_count")
    if not n_exp or not used:
        raise FormatError(
            f"{h.path.name}: a mixture-of-experts file needs {h.architecture}.expert_count and "
            f"{h.architecture}.expert_used_count (found {n_exp or None} and {used})"
        )
    width = k("expert_feed_forward_length")
    if not width:
        gate = h.tensors.get("blk.0.ffn_gate_exps.weight") or h.tensors.get("blk.0.ffn_gate.0.weight")
        width = gate.shape[-2] if gate is not None else k("feed_forward_length")
    if spec.model_type == "mixtral":  # experts are intermediate_size wide; llama.cpp's `llama` has no sliding window
        return {"num_local_experts": n_exp, "num_experts_per_tok": int(used), "intermediate_size": int(width),
                "sliding_window": None}
    return {
        "num_experts": n_exp,
        "num_experts_per_tok": int(used),
        "moe_intermediate_size": int(width),
        "norm_topk_prob": bool(k("expert_weights_norm", True)),
    }


# ---- the source --------------------------------------------------------------


class GGUFSource:
    """A GGUF file as a model source: Hugging Face names, one dequantized tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header = h = read_header(self.path)
        self.file: GGUFFile | None = None
        arch = h.architecture
        spec = arch_of(h)
        if spec is None:
            raise UnsupportedModelError(
                f"{self.path.name}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
            )
        self.arch = spec
        ok = _dequantizable()
        bad = Counter(t.type_name for t in h.tensors.values() if t.ggml_type not in ok)
        if bad:
            listed = ", ".join(f"{n} ({c} tensors)" for n, c in sorted(bad.items()))
            raise UnsupportedModelError(f"{self.path.name}: tensor type(s) not supported: {listed}")
        self._by_hf: dict[str, TensorInfo] = {}
        self._expert: dict[str, int] = {}  # HF name -> its expert's index in a fused (experts, rows, cols) tensor
        unknown = []
        for t in h.tensors.values():
            experts = _expert_names(self.arch, t)
            if experts is not None:
                for hf, j in experts.items():
                    self._by_hf[hf] = t
                    if j is not None:
                        self._expert[hf] = j
                continue
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
        check_tokenizer(h.metadata, self.path.name)
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
        shape = self._by_hf[name].shape
        return shape[1:] if name in self._expert else shape

    def tensor_dtype(self, name: str) -> torch.dtype:
        t = self._by_hf[name]
        if t.ggml_type in (F16, BF16) and not self._offset_norm(name):
            return _PLAIN[t.ggml_type][1]
        return torch.float32

    def _offset_norm(self, name: str) -> bool:
        return self.arch.norm_plus_one and name.endswith("norm.weight")

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor under its HF name, in ``tensor_dtype(name)``; or in ``dtype`` when one is given.

        ``dtype`` (an optional extension of :class:`ModelSource`'s ``get``, which the converter
        passes when it stores the tensor at that dtype) returns exactly ``get(name).to(dtype)``,
        but a large tensor is converted row chunk by row chunk into the output, without first
        holding all of it in float32 (Gemma 3 270M's 262k x 640 embedding: 671 MB).
        """
        if self.file is None:
            raise FormatError(f"{self.path}: source is closed")
        gguf_name = self._by_hf[name].name
        if name in self._expert:  # one expert's rows of the fused tensor, read and dequantized alone
            return self.file.read(gguf_name, dtype, index=self._expert[name])
        if self._offset_norm(name):
            x = self.file.read(gguf_name).float() - 1.0  # in float32, as transformers does, so precision near 1.0 is kept
        else:
            x = self.file.read(gguf_name, dtype)
        if self.arch.permute_qk and (".q_proj." in name or ".k_proj." in name):
            n = self.config["num_attention_heads"] if ".q_proj." in name else self.config["num_key_value_heads"]
            x = _unpermute(x, n)  # a permutation of rows: the same before or after a cast
        return x if dtype is None else x.to(dtype)

    def aux_names(self) -> list[str]:
        """The files :meth:`write_aux_files` will write."""
        meta = self.header.metadata
        names = ["tokenizer.json", "tokenizer_config.json"] if "tokenizer.ggml.tokens" in meta else []
        if names and meta.get("tokenizer.chat_template"):
            names.append("chat_template.jinja")
        if any(k in self.config for k in ("bos_token_id", "eos_token_id", "pad_token_id")):
            names.append("generation_config.json")
        return [*names, "config.json"]

    def write_aux_files(self, dst: Path) -> list[str]:
        """tokenizer.json, tokenizer_config.json, chat_template.jinja (if any), generation_config.json, config.json."""
        dst = Path(dst)
        written = write_tokenizer_files(self.header.metadata, dst, self.path.name)
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


# ---- tokenizer (built in gguf_tokenizer) ------------------------------------------


def build_tokenizer(h: GGUFHeader):
    """(tokenizers.Tokenizer, tokenizer_config dict, chat template or None) for the file's vocabulary.

    Kept for callers that pass a header; the builder is
    :func:`layerrun.formats.gguf_tokenizer.tokenizer_from_metadata`.
    """
    return tokenizer_from_metadata(h.metadata, h.path.name)


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
    spec = arch_of(h)
    if spec is None:
        problems.append(f"architecture {h.architecture!r} is not supported")
    bad = sorted({t.type_name for t in h.tensors.values() if t.ggml_type not in ok})
    if bad:
        problems.append(f"tensor type(s) not supported: {', '.join(bad)}")
    tokens = meta.get("tokenizer.ggml.tokens")
    file_type = meta.get("general.file_type")
    experts = {}
    if _expert_count(h):
        experts = {
            "num_experts": _expert_count(h),
            "num_experts_per_tok": k("expert_used_count"),
            "expert_intermediate_size": k("expert_feed_forward_length") or k("feed_forward_length"),
        }
    return {
        "path": str(Path(path).resolve()),
        "format": "gguf",
        "gguf_version": h.version,
        "name": meta.get("general.name"),
        "architecture": h.architecture,
        "model_type": spec.model_type if spec is not None else None,
        "supported": not problems,
        "problems": problems,
        "file_type": _FILE_TYPES.get(file_type, file_type),
        "num_layers": k("block_count"),
        "context_length": k("context_length"),
        "hidden_size": k("embedding_length"),
        "intermediate_size": k("feed_forward_length"),
        "num_attention_heads": k("attention.head_count"),
        "num_key_value_heads": k("attention.head_count_kv"),
        **experts,
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
