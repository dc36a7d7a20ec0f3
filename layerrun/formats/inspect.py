"""`layerrun inspect`: what is in a Hugging Face folder, a layered folder or a GGUF file."""

from __future__ import annotations

import os
from pathlib import Path

from layerrun.errors import FormatError, LayerRunError
from layerrun.formats.files import is_file, optional_json, read_json
from layerrun.formats.manifest import MANIFEST_NAME, Manifest, layer_file_name
from layerrun.formats.source import split_name


def _arch(config: dict) -> dict:
    from layerrun.models import build_model

    info = {"model_type": config.get("model_type")}
    try:
        model = build_model(config)
        a = model.args
        info.update(
            supported=True,
            layers=a.num_hidden_layers,
            hidden_size=a.hidden_size,
            intermediate_size=a.intermediate_size,
            heads=a.num_attention_heads,
            kv_heads=a.num_key_value_heads,
            head_dim=a.head_dim,
            vocab_size=a.vocab_size,
            context_length=a.max_position_embeddings,
            tie_word_embeddings=a.tie_word_embeddings,
            rope_theta=a.rope_theta,
        )
        if getattr(model, "moe", False):
            info.update(experts=model.n_experts, experts_per_token=model.top_k)
    except LayerRunError as e:
        info.update(supported=False, error=str(e))
    except (TypeError, ValueError, NotImplementedError) as e:
        info.update(supported=False, error=f"config cannot be read: {e}")
    return info


def _tokenizer_info(folder: Path) -> dict:
    chat = is_file(folder, "chat_template.jinja")
    if not chat and os.path.lexists(folder / "tokenizer_config.json"):
        chat = bool(read_json(folder, "tokenizer_config.json", "tokenizer config").get("chat_template"))
    return {"tokenizer": is_file(folder, "tokenizer.json"), "chat_template": chat}


def _compare(expected: dict, have: dict[str, dict[str, tuple]], tie: bool, n_layers: int) -> dict:
    """Missing and unexpected tensors, grouped file name -> tensor names."""
    missing, unexpected, bad = [], [], []
    groups = [("embeddings.safetensors", expected["embeddings"]), ("final.safetensors", expected["final"])]
    groups += [(layer_file_name(i), expected["layer"]) for i in range(n_layers)]
    for fname, want in groups:
        got = have.get(fname, {})
        missing += [f"{fname}:{n}" for n in sorted(set(want) - set(got))]
        unexpected += [
            f"{fname}:{n}" for n in sorted(set(got) - set(want))
            if not (tie and n == "lm_head.weight") and not n.endswith("rotary_emb.inv_freq")
        ]
        bad += [
            f"{fname}:{n} {list(got[n])} != {list(want[n])}"
            for n in sorted(set(got) & set(want)) if tuple(got[n]) != tuple(want[n])
        ]
    return {"missing": missing, "unexpected": unexpected, "shape_mismatch": bad}


def inspect_layered(folder: Path) -> dict:
    from layerrun.models import build_model

    m = Manifest.read(folder)
    config = optional_json(folder, "config.json", "config") or {}
    layer_bytes = [f.bytes for f in m.layers]
    if m.quantization:
        from layerrun.formats.quant import logical_tensors

        shapes = {f.name: logical_tensors(f.tensors, m.quantization) for f in m.files}
    else:
        shapes = {f.name: {n: tuple(t.shape) for n, t in f.tensors.items()} for f in m.files}
    params = sum(_numel(s) for fs in shapes.values() for s in fs.values())
    dtypes = sorted({t.dtype for f in m.files for t in f.tensors.values()})
    info = {
        "path": str(folder),
        "format": f"layerrun layered v{m.format_version}",
        **_arch(config),
        "parameters": params,
        "dtype": m.dtype,
        "tensor_dtypes": dtypes,
        "quantization": m.quantization,
        "bytes_total": m.total_bytes,
        "bytes_embeddings": m.embeddings.bytes,
        "bytes_final": m.final.bytes,
        "bytes_per_layer": {"min": min(layer_bytes, default=0), "max": max(layer_bytes, default=0)},
        "files": len(m.files),
        "source": m.source,
        **_tokenizer_info(folder),
    }
    if info.get("experts"):
        info.update(_moe_figures(m, shapes, info["experts"], info["experts_per_token"]))
    try:
        exp = build_model(config).expected_tensors()
        info["tensor_check"] = _compare(exp, shapes, m.tie_word_embeddings, m.num_layers)
    except (LayerRunError, TypeError, ValueError, NotImplementedError):
        pass
    return info


def _moe_figures(m: Manifest, shapes: dict, n_experts: int, top_k: int) -> dict:
    """Per-token figures of a mixture-of-experts model: parameters used (the routed experts only)
    and the bytes stream mode reads for one sequence (attention + router, and top_k experts, per layer)."""
    from layerrun.models.base import expert_index

    expert_params = sum(_numel(s) for f in m.layers for n, s in shapes[f.name].items() if expert_index(n) is not None)
    total = sum(_numel(s) for fs in shapes.values() for s in fs.values())
    per_token = 0
    for f in m.layers:
        experts = sum(t.nbytes for n, t in f.tensors.items() if expert_index(n) is not None)
        per_token += (f.bytes - f.data_start - experts) + experts * top_k // n_experts
    return {
        "active_parameters": total - expert_params + expert_params * top_k // n_experts,
        "bytes_stream_per_token": per_token,
    }


def inspect_hf(folder: Path) -> dict:
    from layerrun.formats.hf import find_weight_files, read_config, read_headers
    from layerrun.models import build_model

    config = read_config(folder)
    files = find_weight_files(folder)
    infos, _ = read_headers(folder, files)  # every header checked (offsets, overlaps, dtypes) as convert does
    have: dict[str, dict[str, tuple]] = {}
    per_file_bytes: dict[str, int] = {}
    dtypes: set[str] = set()
    params = 0
    for name, (_, info) in sorted(infos.items()):
        shape, dt = tuple(info.shape), info.dtype
        dtypes.add(dt)
        params += _numel(shape)
        kind, idx, short = split_name(name)
        fname = layer_file_name(idx) if kind == "layer" else f"{kind}.safetensors"
        have.setdefault(fname, {})[short] = shape
        per_file_bytes[fname] = per_file_bytes.get(fname, 0) + info.nbytes
    layer_bytes = [v for k, v in per_file_bytes.items() if k.startswith("layer_")]
    info = {
        "path": str(folder),
        "format": f"huggingface safetensors ({len(files)} file{'s' if len(files) > 1 else ''})",
        **_arch(config),
        "parameters": params,
        "tensor_dtypes": sorted(dtypes),
        "bytes_total": sum(per_file_bytes.values()),
        "bytes_per_layer": {"min": min(layer_bytes, default=0), "max": max(layer_bytes, default=0)},
        **_tokenizer_info(folder),
    }
    try:
        model = build_model(config)
        tie = bool(config.get("tie_word_embeddings", model.args.tie_word_embeddings))
        info["tensor_check"] = _compare(model.expected_tensors(), have, tie, model.args.num_hidden_layers)
    except (LayerRunError, TypeError, ValueError, NotImplementedError):
        pass
    return info


def inspect_path(path: str | Path) -> dict:
    p = Path(path)
    if not os.path.lexists(p):
        raise FormatError(f"{p}: no such file or folder")
    if not p.is_dir() and p.suffix.lower() == ".gguf":
        from layerrun.formats.gguf import inspect_gguf

        return inspect_gguf(p)  # refuses anything but a regular file
    if p.is_dir() and os.path.lexists(p / MANIFEST_NAME):
        return inspect_layered(p)
    if p.is_dir():
        return inspect_hf(p)
    raise FormatError(f"{p}: expected a model folder (Hugging Face or layered) or a .gguf file")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
