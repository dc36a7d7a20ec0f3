"""Build tiny random-weight Hugging Face models from transformers config classes.

Used by the tests (and handy for experiments): each spec gives a model_type and
config overrides; the folder gets config.json, safetensors weights (single or
sharded, in the requested dtype) and a small byte-level BPE tokenizer with a
chat template, so generation from text works end to end.

    python tools/tiny_models.py OUT_DIR [--spec llama_gqa ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPECS: dict[str, dict] = {
    # GQA 4:2, untied embeddings
    "llama_gqa": dict(model_type="llama", overrides=dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # tied embeddings, full MHA, sharded checkpoint
    "llama_tied_sharded": dict(model_type="llama", overrides=dict(num_key_value_heads=4, tie_word_embeddings=True), shard=True),
    # mistral with a sliding window shorter than the test contexts
    "mistral": dict(model_type="mistral", overrides=dict(num_key_value_heads=1, sliding_window=16, tie_word_embeddings=False)),
    # qwen2 with q/k/v bias, GQA 4:1... stored in bf16
    "qwen2_bf16": dict(model_type="qwen2", overrides=dict(num_key_value_heads=2, tie_word_embeddings=True), dtype="bfloat16"),
    "qwen2": dict(model_type="qwen2", overrides=dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # ---- families beyond Llama (tests/test_families.py) ----
    # gemma: head_dim 24 != 64/4, full MHA, tied, odd vocab
    "gemma": dict(model_type="gemma", overrides=dict(num_key_value_heads=4, head_dim=24, vocab_size=321)),
    # gemma2: GQA 6:2 (ratio 3), head_dim 16 != 48/6, even/odd sliding rule, window 8, caps that bite
    "gemma2": dict(model_type="gemma2", overrides=dict(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16, num_hidden_layers=4, sliding_window=8,
        query_pre_attn_scalar=20, attn_logit_softcapping=2.0, final_logit_softcapping=4.0)),
    # gemma2: explicit layer_types, MQA (4:1), untied, odd vocab, window 5
    "gemma2_layer_types": dict(model_type="gemma2", overrides=dict(
        num_key_value_heads=1, head_dim=32, vocab_size=317, tie_word_embeddings=False, sliding_window=5,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
    # gemma3 text: q/k norm, pattern 2 (S F S F), local/global RoPE bases, linear scaling on global, final cap
    "gemma3": dict(model_type="gemma3_text", overrides=dict(
        num_key_value_heads=2, head_dim=32, num_hidden_layers=4, sliding_window=8, sliding_window_pattern=2,
        rope_theta=100000.0, rope_local_base_freq=5000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
        query_pre_attn_scalar=24, final_logit_softcapping=4.0)),
    # gemma3 text: explicit layer_types, MHA, untied; attn_logit_softcapping set (transformers ignores it)
    "gemma3_layer_types": dict(model_type="gemma3_text", overrides=dict(
        num_key_value_heads=4, head_dim=16, tie_word_embeddings=False, sliding_window=6, attn_logit_softcapping=2.0,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"])),
    # qwen3: GQA 6:2 (ratio 3), head_dim 24, untied
    "qwen3": dict(model_type="qwen3", overrides=dict(
        num_attention_heads=6, num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
    # qwen3: sliding window from layer 1 on (max_window_layers), MHA, tied, odd vocab
    "qwen3_sliding": dict(model_type="qwen3", overrides=dict(
        num_key_value_heads=4, head_dim=16, tie_word_embeddings=True, vocab_size=319,
        use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    # phi3: fused qkv / gate_up, LongRoPE switching from short to long factors past position 24
    "phi3": dict(model_type="phi3", overrides=dict(
        num_key_value_heads=4, tie_word_embeddings=False, pad_token_id=0, original_max_position_embeddings=24,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
                      "long_factor": [1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 9.0, 12.0]})),
    # phi3 (Phi-4-mini style): partial RoPE (0.75), GQA 4:2, tied, global sliding window 8
    "phi3_partial": dict(model_type="phi3", overrides=dict(
        num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, partial_rotary_factor=0.75, sliding_window=8)),
    # mixtral: 6 experts, top-2, GQA 4:2, untied, sliding window 8, odd vocab
    "mixtral": dict(model_type="mixtral", overrides=dict(
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, intermediate_size=96,
        sliding_window=8, tie_word_embeddings=False, vocab_size=323)),
    # mixtral: 4 experts, top-1, MHA, tied, head_dim 24 != 64/4, stored in bf16
    "mixtral_top1_bf16": dict(model_type="mixtral", overrides=dict(
        num_key_value_heads=4, head_dim=24, num_local_experts=4, num_experts_per_tok=1, tie_word_embeddings=True),
        dtype="bfloat16"),
    # qwen3_moe: 8 experts, top-3, norm_topk_prob, GQA 4:2, head_dim 24, untied
    "qwen3_moe": dict(model_type="qwen3_moe", overrides=dict(
        num_key_value_heads=2, head_dim=24, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48,
        norm_topk_prob=True, tie_word_embeddings=False), seed=1),  # seed 0 greedy-decodes to one repeated token
    # qwen3_moe: 6 experts, top-2 without renormalising, MHA, tied, odd vocab
    "qwen3_moe_unnorm": dict(model_type="qwen3_moe", overrides=dict(
        num_key_value_heads=4, head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
        norm_topk_prob=False, tie_word_embeddings=True, vocab_size=317, initializer_range=0.2), seed=1),
    # (with the default 0.1 init, un-renormalised weights damp the experts and it repeats one token)
    # llama with dynamic NTK RoPE and a short max_position_embeddings, so the scaling kicks in
    "llama_dynamic": dict(model_type="llama", overrides=dict(
        num_key_value_heads=2, max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
}

BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    vocab_size=320,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # larger than the default 0.02, so random models do not just repeat a token
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on a little English, padded to ``vocab_size`` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    text = [
        "The quick brown fox jumps over the lazy dog. Why is the sky blue? Because of Rayleigh scattering.",
        "Hello world! Streaming layers from disk lets a small machine run a large model, one layer at a time.",
        "def main():\n    print('hello')\n",
        "0123456789 numbers and émojis ✓ unicode",
    ] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=1))


def build(name: str, out: Path, seed: int = 0, tokenizer: bool = True) -> Path:
    import torch
    import transformers

    spec = SPECS[name]
    cfg_cls = transformers.AutoConfig.for_model(spec["model_type"]).__class__
    kwargs = {**BASE, **spec.get("overrides", {})}
    cfg = cfg_cls(**kwargs)
    if tokenizer:
        cfg.eos_token_id = 2  # <|im_end|> in build_tokenizer's vocabulary
        cfg.bos_token_id = None
    torch.manual_seed(spec.get("seed", seed))
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    # Random init has tiny norms/biases; make every parameter matter.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="60KB" if spec.get("shard") else "10GB")
    if tokenizer:
        build_tokenizer(out, kwargs["vocab_size"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to create one sub-folder per spec in")
    ap.add_argument("--spec", action="append", choices=sorted(SPECS), help="which models (default: all)")
    a = ap.parse_args()
    for name in a.spec or sorted(SPECS):
        print(build(name, a.out / name))


if __name__ == "__main__":
    main()
