"""Model families, found by ``config.json``'s ``model_type``.

Each family is one module exposing ``ModelArgs`` (a dataclass of Hugging Face
config fields with ``from_dict``) and ``Model`` (pure compute), whose interface
the engine relies on:

- ``expected_tensors() -> {"embeddings": {name: shape}, "layer": {...}, "final": {...}}``
  (names relative to the group, e.g. ``self_attn.q_proj.weight``; "layer" is
  the same for every layer);
- ``sanitize(weights) -> weights`` on one file's tensors (pure; may drop or rename);
- ``prepare(positions (B,T), key_valid (B,S) bool | None, k_len, dtype) -> ctx``
  per step, shared by all layers (RoPE tables, masks; opaque to the engine);
- ``embed(w, input_ids) -> x (B,T,H)``;
- ``layer(i, w, x, cache: LayerKV | None, ctx) -> x``;
- ``head(w, x, embeddings_w) -> logits (B,T,V)``.

Optional, for families that need them:

- ``moe = True`` with ``n_experts`` and ``top_k``: a mixture-of-experts family whose expert
  tensors are named ``...experts.J...`` (:func:`layerrun.models.base.expert_index`). Its layer
  calls ``w.load_experts(ids)`` when the weight dict has that method, before touching experts
  ``ids`` (the engine then reads only those; :mod:`layerrun.models.moe`).
- ``rerun_prefix_at``: a position at which a running sequence's KV cache must be recomputed
  from its whole sequence (Phi-3 LongRoPE switching to its long factors).
"""

from __future__ import annotations

import importlib

from layerrun.errors import FormatError, UnsupportedModelError

# model_type -> module in layerrun.models
REGISTRY: dict[str, str] = {
    "llama": "llama",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "mixtral": "mixtral",
    "qwen3_moe": "qwen3_moe",
}
# model_type -> model_type whose code it shares
ALIASES: dict[str, str] = {
    "mistral": "llama",
    "qwen2": "llama",
}


def supported_model_types() -> list[str]:
    return sorted(set(REGISTRY) | set(ALIASES))


def get_family(model_type: str):
    """The family module for ``model_type``; an unknown type fails with the supported list."""
    key = ALIASES.get(model_type, model_type)
    if key not in REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return importlib.import_module(f"layerrun.models.{REGISTRY[key]}")


def build_model(config: dict):
    """Build the compute object for a Hugging Face config dict."""
    if not isinstance(config, dict):
        raise FormatError(f"config.json must be a JSON object, found {type(config).__name__}")
    model_type = config.get("model_type")
    if not model_type:
        raise UnsupportedModelError("config.json has no model_type; cannot tell the architecture")
    if not isinstance(model_type, str):
        raise FormatError(f"config.json: model_type {model_type!r} is not a name")
    fam = get_family(model_type)
    try:
        args = fam.ModelArgs.from_dict(config)
        return fam.Model(args)
    except NotImplementedError as e:
        raise UnsupportedModelError(f"{model_type}: {e}") from None
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError) as e:
        raise FormatError(f"config.json ({model_type}) is not valid: {e}") from None
