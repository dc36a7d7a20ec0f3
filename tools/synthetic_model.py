"""A synthetic random-weight Llama of any size, written straight to the layered format.

For testing "a model bigger than memory" and for I/O benchmarks: the weights
are deterministic pseudo-random tensors generated one at a time (the converter
streams them), so a multi-GB model is built without ever holding it.

    python tools/synthetic_model.py OUT [--preset 3gb|3gb-bf16|1gb|moe|qwen3moe|tiny] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

PRESETS = {
    # ~3.4 GB in fp32: 16 layers of ~180 MB
    "3gb": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=16000),
    # ~3.1 GB in bf16 (6.3 GB in fp32): 32 layers of ~90 MB, the shape of a 1.5B Llama
    "3gb-bf16": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=32, num_attention_heads=16,
                     num_key_value_heads=4, vocab_size=32000),
    # ~0.9 GB in fp32: 12 layers of ~61 MB
    "1gb": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=16000),
    # Mixtral-shaped, ~1.2 GB in bf16: 8 layers of 8 experts (top-2) of ~17 MB each
    "moe": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=16000, num_local_experts=8, num_experts_per_tok=2),
    # Qwen3-MoE-shaped, ~0.9 GB in bf16: 4 layers of 128 small experts (intermediate 256), top-8
    "qwen3moe": dict(model_type="qwen3_moe", hidden_size=1024, intermediate_size=3072, num_hidden_layers=4,
                     num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=16000,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=256, norm_topk_prob=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


class SyntheticSource:
    """A ModelSource (see layerrun.formats.source) producing seeded random weights on demand."""

    def __init__(self, preset: str = "3gb", seed: int = 0):
        p = dict(PRESETS[preset])
        kind = p.pop("model_type", "mixtral" if "num_local_experts" in p else "llama")
        moe = kind in ("mixtral", "qwen3_moe")
        arch = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
        self.config = {
            "model_type": kind, "architectures": [arch[kind]], "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, **p,
        }
        self.seed = seed
        H, I, V = p["hidden_size"], p["intermediate_size"], p["vocab_size"]
        D = p.get("head_dim") or H // p["num_attention_heads"]
        KV = p["num_key_value_heads"] * D
        Q = p["num_attention_heads"] * D
        self.shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
        for i in range(p["num_hidden_layers"]):
            pre = f"model.layers.{i}."
            self.shapes.update({
                pre + "input_layernorm.weight": (H,), pre + "post_attention_layernorm.weight": (H,),
                pre + "self_attn.q_proj.weight": (Q, H), pre + "self_attn.k_proj.weight": (KV, H),
                pre + "self_attn.v_proj.weight": (KV, H), pre + "self_attn.o_proj.weight": (H, Q),
            })
            if kind == "qwen3_moe":
                self.shapes.update({pre + "self_attn.q_norm.weight": (D,), pre + "self_attn.k_norm.weight": (D,),
                                    pre + "mlp.gate.weight": (p["num_experts"], H)})
                for j in range(p["num_experts"]):
                    e = f"{pre}mlp.experts.{j}."
                    Im = p["moe_intermediate_size"]
                    self.shapes.update({e + "gate_proj.weight": (Im, H), e + "up_proj.weight": (Im, H),
                                        e + "down_proj.weight": (H, Im)})
            elif moe:
                self.shapes[pre + "block_sparse_moe.gate.weight"] = (p["num_local_experts"], H)
                for j in range(p["num_local_experts"]):
                    e = f"{pre}block_sparse_moe.experts.{j}."
                    self.shapes.update({e + "w1.weight": (I, H), e + "w3.weight": (I, H), e + "w2.weight": (H, I)})
            else:
                self.shapes.update({pre + "mlp.gate_proj.weight": (I, H), pre + "mlp.up_proj.weight": (I, H),
                                    pre + "mlp.down_proj.weight": (H, I)})

    def description(self) -> dict:
        return {"kind": "synthetic", "seed": self.seed, "config": {k: self.config[k] for k in PRESETS["tiny"]}}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.config, self.seed]).encode()).hexdigest()[:16]

    def tensor_names(self) -> list[str]:
        return sorted(self.shapes)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def tensor_dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def get(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(hashlib.md5(name.encode()).hexdigest()[:8], 16))
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * torch.randn(shape, generator=g)
        return torch.randn(shape, generator=g) * (1.0 / shape[-1] ** 0.5)

    def write_aux_files(self, dst: Path) -> list[str]:
        (dst / "config.json").write_text(json.dumps(self.config, indent=2))
        return ["config.json"]

    def close(self) -> None:
        pass


def build(out: Path, preset: str = "3gb", dtype: str = "float32", progress: bool = False, seed: int = 0) -> Path:
    from layerrun.formats.convert import convert

    convert(SyntheticSource(preset, seed), out, dtype=dtype, progress=progress, force=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="destination layered folder")
    ap.add_argument("--preset", default="3gb", choices=sorted(PRESETS), help="model size")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="storage dtype")
    ap.add_argument("--seed", type=int, default=0, help="weights seed")
    a = ap.parse_args()
    build(a.out, a.preset, a.dtype, progress=sys.stderr.isatty(), seed=a.seed)
    print(a.out)


if __name__ == "__main__":
    main()
