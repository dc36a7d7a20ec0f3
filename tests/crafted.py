"""Builders of damaged and hostile model files for tests/test_hostile_files.py and tests/test_fuzz_files.py.

Everything is made by code from the tiny test models (no checked-in blobs): raw safetensors headers,
raw GGUF files (written byte by byte here, so that a test can state a wrong alignment, nest arrays,
repeat a tensor name or leave out a key the ``gguf`` package's writer would insist on), and edits of a
layered folder's manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

# ---- safetensors ------------------------------------------------------------------------------------


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def rewrite_header(path: Path, edit) -> None:
    """Apply ``edit(header) -> header`` to a safetensors file, keeping its data bytes."""
    header, data = read_safetensors(path)
    path.write_bytes(safetensors_bytes(edit(header), data))


# ---- layered folders ---------------------------------------------------------------------------------


def edit_manifest(folder: Path, edit) -> None:
    """Apply ``edit(dict) -> dict | None`` (None: edited in place) to ``layerrun.json``."""
    p = folder / "layerrun.json"
    d = json.loads(p.read_text())
    out = edit(d)
    p.write_text(json.dumps(d if out is None else out))


def entry(d: dict, name: str) -> dict:
    return next(f for f in d["files"] if f["name"] == name)


def edit_config(folder: Path, **changes) -> None:
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def restamp(folder: Path, name: str) -> None:
    """Make the manifest agree with a file's new bytes (size and sha256), as a forger would."""
    raw = (folder / name).read_bytes()

    def edit(d):
        e = entry(d, name)
        e["bytes"] = len(raw)
        e["sha256"] = hashlib.sha256(raw).hexdigest()

    edit_manifest(folder, edit)


# ---- GGUF ----------------------------------------------------------------------------------------------

U32, I32, F32_T, BOOL, STRING, ARRAY, U64 = 4, 5, 6, 7, 8, 9, 10
GGML_F32 = 0


def _s(text: str) -> bytes:
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, v) -> bytes:
    if vtype == STRING:
        return _s(v)
    if vtype == ARRAY:
        etype, items = v
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, x) for x in items)
    return struct.pack("<" + {U32: "I", I32: "i", F32_T: "f", BOOL: "?", U64: "Q"}[vtype], v)


def gguf_bytes(kv: list[tuple[str, int, object]], tensors: list[tuple[str, np.ndarray]], align: int = 32,
               data_align: int | None = None, version: int = 3, n_kv: int | None = None,
               dims: dict[str, list[int]] | None = None) -> bytes:
    """A GGUF file: ``kv`` (key, type, value), F32 ``tensors`` (name, array). ``data_align`` lays the data
    out at a different alignment than the one ``general.alignment`` states (when that key is in ``kv``)."""
    data_align = data_align or align
    infos, blobs, off = [], [], 0
    for name, a in tensors:
        a = np.ascontiguousarray(a, dtype=np.float32)
        shape = dims.get(name) if dims and name in dims else list(reversed(a.shape))  # ggml order: columns first
        infos.append(_s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
                     + struct.pack("<IQ", GGML_F32, off))
        blob = a.tobytes()
        blob += b"\0" * ((-len(blob)) % data_align)
        blobs.append(blob)
        off += len(blob)
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv) if n_kv is None else n_kv)
    head += b"".join(_s(k) + struct.pack("<I", t) + _value(t, v) for k, t, v in kv)
    head += b"".join(infos)
    head += b"\0" * ((-len(head)) % data_align)
    return head + b"".join(blobs)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def tiny_gguf_parts(hf: Path) -> tuple[list, list]:
    """(metadata, tensors) of a valid llama GGUF made from a tiny HF folder (values as stored; enough for
    the structure tests, which never compare logits)."""
    cfg = json.loads((hf / "config.json").read_text())
    w = load_file(str(hf / "model.safetensors"))
    tensors = []
    for name, a in sorted(w.items()):
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            stem, suffix = rest.rsplit(".", 1)
            g = f"blk.{i}.{_GGUF_NAMES[stem]}.{suffix}"
        tensors.append((g, a))
    kv = [
        ("general.architecture", STRING, "llama"),
        ("llama.block_count", U32, cfg["num_hidden_layers"]),
        ("llama.context_length", U32, cfg["max_position_embeddings"]),
        ("llama.embedding_length", U32, cfg["hidden_size"]),
        ("llama.feed_forward_length", U32, cfg["intermediate_size"]),
        ("llama.attention.head_count", U32, cfg["num_attention_heads"]),
        ("llama.attention.head_count_kv", U32, cfg["num_key_value_heads"]),
        ("llama.rope.dimension_count", U32, cfg["hidden_size"] // cfg["num_attention_heads"]),
        ("llama.attention.layer_norm_rms_epsilon", F32_T, cfg["rms_norm_eps"]),
        ("llama.vocab_size", U32, cfg["vocab_size"]),
    ]
    return kv, tensors


def replace_kv(kv: list, key: str, vtype: int | None = None, value=None) -> list:
    """``kv`` with ``key`` set (or removed when ``vtype`` is None)."""
    out = [x for x in kv if x[0] != key]
    return out if vtype is None else [*out, (key, vtype, value)]


def make_fifo(path: Path) -> Path:
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path)
    return path
