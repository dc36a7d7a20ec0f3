"""A layered Llama folder written as a GGUF file, so that llama.cpp can run the very same weights.

For models that have no GGUF source (the synthetic models of tools/synthetic_model.py), so that
bench/compute_speed.py can compare LayerRun with llama.cpp on them. Llama architecture only
(``model_type`` llama, no biases); float32 or bfloat16 weights are written as they are stored.
The checkpoint's q/k rows are permuted into GGUF's RoPE order as llama.cpp's own
convert_hf_to_gguf.py does, so greedy tokens can be compared too. The vocabulary is a dummy
SentencePiece one (``<unk> <s> </s>`` and ``t3 … tN``): compute_speed.py feeds token ids, never text.

    pip install gguf
    python bench/layered_to_gguf.py FOLDER OUT.gguf
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from layerrun.formats.manifest import Manifest  # noqa: E402

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> GGUF's interleaved pairs (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read(folder: Path, entry) -> dict[str, torch.Tensor]:
    with safe_open(folder / entry.name, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def to_numpy(t: torch.Tensor):
    """(array, raw GGML type or None): bfloat16 goes as its raw 16 bits, typed BF16."""
    import gguf

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16
    return t.to(torch.float32).contiguous().numpy(), None


def main() -> int:
    import gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    cfg = json.loads((a.folder / "config.json").read_text())
    if cfg.get("model_type") != "llama" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise SystemExit(f"{a.folder}: only Llama models without biases are supported")
    m = Manifest.read(a.folder)
    if m.quantization:
        raise SystemExit(f"{a.folder}: quantized folders are not supported (float32 / bfloat16 only)")
    H, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    V = cfg["vocab_size"]
    w = gguf.GGUFWriter(str(a.out), "llama")
    w.add_name(a.folder.name)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(H)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(cfg.get("head_dim") or H // heads)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(V)
    emb = read(a.folder, m.embeddings)["embed_tokens.weight"]
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if emb.dtype == torch.bfloat16 else gguf.LlamaFileType.ALL_F32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, V)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * V)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.NORMAL] * (V - 3))
    w.add_bos_token_id(cfg.get("bos_token_id", 1))
    w.add_eos_token_id(cfg.get("eos_token_id", 2))
    w.add_add_bos_token(False)

    def add(name: str, t: torch.Tensor) -> None:
        arr, raw = to_numpy(t)
        if raw is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_shape=arr.shape, raw_dtype=raw)

    add("token_embd.weight", emb)
    for e in m.layers:
        t = read(a.folder, e)
        for src, dst in LAYER_NAMES.items():
            x = t[src]
            if src == "self_attn.q_proj.weight":
                x = permute(x, heads)
            elif src == "self_attn.k_proj.weight":
                x = permute(x, kv_heads)
            if x.dim() == 1:
                x = x.float()  # norms: llama.cpp wants f32 vectors
            add(f"blk.{e.layer}.{dst}", x)
    final = read(a.folder, m.final)
    add("output_norm.weight", final["norm.weight"].float())
    add("output.weight", final.get("lm_head.weight", emb))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=sys.stderr.isatty())
    w.close()
    print(a.out)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
