"""The Llama family: llama, mistral and qwen2 share this code.

Qwen2 differs only by q/k/v biases; Mistral by an optional sliding window.
Weight names follow the Hugging Face checkpoint, relative to one decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerrun.models.base import (
    AttnContext,
    BaseArgs,
    attention,
    dynamic_ntk_inv_freq,
    fuse_linears,
    rms_norm,
    rope_cos_sin,
    rope_heads,
    rope_inv_freq,
    step_context,
)

QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
# (weight, bias) names of the fused products made by Model.fuse for resident layers
QKV_FUSED = ("self_attn.qkv_fused.weight", "self_attn.qkv_fused.bias")
GATE_UP_FUSED = ("mlp.gate_up_fused.weight", "mlp.gate_up_fused.bias")

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class ModelArgs(BaseArgs):
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    use_sliding_window: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.model_type == "qwen2":
            self.attention_bias = True  # Qwen2 always has q/k/v biases (o_proj has none)
            if not self.use_sliding_window:
                self.sliding_window = None
        if self.hidden_act not in ACTIVATIONS:
            raise NotImplementedError(f"hidden_act {self.hidden_act!r} is not supported")


class Model:
    """Stateless compute for one Llama-family model; weights are passed in per call."""

    def __init__(self, args: ModelArgs):
        self.args = args
        scaling = args.rope_scaling
        self.dynamic_factor = None
        if scaling and scaling.get("rope_type", scaling.get("type")) == "dynamic":
            # Dynamic NTK: plain RoPE until a step reaches past max_position_embeddings (see step_inv_freq).
            self.dynamic_factor, scaling = float(scaling["factor"]), None
        self.inv_freq, self.rope_scale = rope_inv_freq(
            args.head_dim, args.rope_theta, scaling, args.max_position_embeddings
        )
        self.act = ACTIVATIONS[args.hidden_act]

    # ---- what the checkpoint must contain ------------------------------
    def expected_tensors(self) -> dict[str, dict[str, tuple[int, ...]]]:
        a = self.args
        H, D, Hkv, I = a.hidden_size, a.head_dim, a.num_key_value_heads, a.intermediate_size
        layer = {
            "input_layernorm.weight": (H,),
            "post_attention_layernorm.weight": (H,),
            "self_attn.q_proj.weight": (a.num_attention_heads * D, H),
            "self_attn.k_proj.weight": (Hkv * D, H),
            "self_attn.v_proj.weight": (Hkv * D, H),
            "self_attn.o_proj.weight": (H, a.num_attention_heads * D),
            "mlp.gate_proj.weight": (I, H),
            "mlp.up_proj.weight": (I, H),
            "mlp.down_proj.weight": (H, I),
        }
        if a.attention_bias:
            layer.update({
                "self_attn.q_proj.bias": (a.num_attention_heads * D,),
                "self_attn.k_proj.bias": (Hkv * D,),
                "self_attn.v_proj.bias": (Hkv * D,),
            })
            if a.model_type != "qwen2":
                layer["self_attn.o_proj.bias"] = (H,)
        if a.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (I,), "mlp.up_proj.bias": (I,), "mlp.down_proj.bias": (H,)})
        final = {"norm.weight": (H,)}
        if not a.tie_word_embeddings:
            final["lm_head.weight"] = (a.vocab_size, H)
        return {"embeddings": {"embed_tokens.weight": (a.vocab_size, H)}, "layer": layer, "final": final}

    @staticmethod
    def sanitize(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Old checkpoints carry RoPE's inverse frequencies; we compute our own.
        return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}

    # ---- resident layers: fewer, larger products ---------------------------
    # (parts, (fused weight, fused bias)): streamed layers get these fused products as views of the
    # file where it stores the parts back to back (engine: Engine._view_entry)
    fused_groups = ((QKV, QKV_FUSED), (GATE_UP, GATE_UP_FUSED))

    def fuse(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A resident layer's q/k/v weights (and biases) as one (QKV_FUSED), gate/up as one (GATE_UP_FUSED).

        One product instead of three (two) per step: the same sums, in one kernel call. Plain tensors
        of one dtype only; a layer without them (quantized, MoE experts) is returned as it is.
        """
        return fuse_linears(fuse_linears(w, QKV, QKV_FUSED), GATE_UP, GATE_UP_FUSED)

    # ---- compute ---------------------------------------------------------
    def prepare(
        self, positions: torch.Tensor, key_valid: torch.Tensor | None, k_len: int, dtype, tree: torch.Tensor | None = None
    ) -> AttnContext:
        """Per-step tables shared by all layers: RoPE cos/sin and the attention mask (``tree``: the new
        tokens form a token tree, see :func:`layerrun.models.base.build_mask`)."""
        cos, sin = rope_cos_sin(self.step_inv_freq(positions), positions, dtype, self.rope_scale)
        return step_context(positions, key_valid, k_len, cos, sin, self.args.sliding_window or None, tree)

    def step_inv_freq(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE inverse frequencies for this step; only dynamic NTK scaling depends on the positions.

        Dynamic NTK: as transformers, a step's furthest position decides the base; per row (B, 1,
        dim/2), since the rows of a batch are independent sequences.
        """
        if self.dynamic_factor is None:
            return self.inv_freq.to(positions.device)
        a = self.args
        rows = [
            dynamic_ntk_inv_freq(a.head_dim, a.rope_theta, self.dynamic_factor, int(m) + 1, a.max_position_embeddings)
            for m in positions.max(dim=-1).values.tolist()
        ]
        return torch.stack(rows)[:, None].to(positions.device)  # (B, 1, dim/2)

    def max_tree_depth(self, position: int) -> int | None:
        """How far past a token tree's root at ``position`` one pass may reach and still compute what
        a token at a time would (None: no limit). Dynamic NTK RoPE past max_position_embeddings
        changes its base with each step's furthest position, so a tree must stay below it."""
        if self.dynamic_factor is None:
            return None
        return max(0, self.args.max_position_embeddings - 1 - position)

    def embed(self, w: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, w["embed_tokens.weight"])  # (B, T, H)

    # ---- hooks the other families override --------------------------------
    norm = staticmethod(rms_norm)  # Gemma: (1 + weight), scaled in fp32

    def qk_norm(self, w: dict[str, torch.Tensor], qk: torch.Tensor) -> torch.Tensor:
        """Nothing in Llama (``qk`` itself); Qwen 3 and Gemma 3 normalise each head of the queries and keys
        here: ``qk`` (B, T, H + Hkv, D), queries' heads then keys'."""
        return qk

    def norm_at(self, w: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
        """:attr:`norm` of ``x`` with the layer's weight ``name`` (Gemma: a scale the resident layer made once)."""
        return self.norm(x, w[name], self.args.rms_norm_eps)

    def layer_context(self, i: int, ctx):
        """The attention context of layer ``i``; families with per-layer-type masks pick theirs."""
        return ctx

    def self_attn(self, w, h: torch.Tensor, cache, c: AttnContext, scale: float, softcap: float | None = None):
        """Projections, RoPE, KV cache and attention for normalised input ``h``; returns o_proj's output.

        The heads stay laid out (B, T, heads, D) as the q/k/v product makes them: RoPE rotates queries and
        keys in one go, and the new keys and values reach the cache side by side in one copy
        (``LayerKV.update_kv``); attention reads them through transposed views. Few ops per layer: at
        decode (T = 1) their per-call cost, not their arithmetic, is what a step spends outside the products.
        """
        a = self.args
        B, T, _ = h.shape
        H, Hkv, D = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        qkv = w.get(QKV_FUSED[0])
        if qkv is not None:
            qkv = F.linear(h, qkv, w.get(QKV_FUSED[1]))
        else:
            qkv = torch.cat([F.linear(h, w[f"{p}.weight"], w.get(f"{p}.bias")) for p in QKV], dim=-1)
        qkv = qkv.reshape(B, T, H + 2 * Hkv, D)
        qk = self.qk_norm(w, qkv[:, :, : H + Hkv])
        r = torch.cat((rope_heads(qk, c.rope), qkv[:, :, H + Hkv :]), dim=2)  # (B, T, H + 2*Hkv, D)
        q, kv = r[:, :, :H].transpose(1, 2), r[:, :, H:]  # (B, H, T, D), (B, T, 2*Hkv, D)
        update_kv = getattr(cache, "update_kv", None)
        if update_kv is not None:
            k, v = update_kv(kv)  # (B, Hkv, S, D)
        else:
            k, v = kv[:, :, :Hkv].transpose(1, 2), kv[:, :, Hkv:].transpose(1, 2)  # (B, Hkv, T, D)
            if cache is not None:
                k, v = cache.update(k, v)
        o = attention(q, k, v, c.mask, c.is_causal, scale, softcap)
        o = o.transpose(1, 2).reshape(B, T, H * D)
        return F.linear(o, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))

    def mlp(self, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
        gate_up = w.get(GATE_UP_FUSED[0])
        if gate_up is not None:
            gate, up = F.linear(h, gate_up, w.get(GATE_UP_FUSED[1])).chunk(2, dim=-1)
            return F.linear(self.act(gate) * up, w["mlp.down_proj.weight"], w.get("mlp.down_proj.bias"))
        gate = F.linear(h, w["mlp.gate_proj.weight"], w.get("mlp.gate_proj.bias"))
        up = F.linear(h, w["mlp.up_proj.weight"], w.get("mlp.up_proj.bias"))
        return F.linear(self.act(gate) * up, w["mlp.down_proj.weight"], w.get("mlp.down_proj.bias"))

    def layer(self, i: int, w: dict[str, torch.Tensor], x: torch.Tensor, cache, ctx) -> torch.Tensor:
        h = self.norm_at(w, "input_layernorm.weight", x)
        x = x + self.self_attn(w, h, cache, self.layer_context(i, ctx), self.args.head_dim**-0.5)
        return x + self.mlp(w, self.norm_at(w, "post_attention_layernorm.weight", x))

    def head(self, w: dict[str, torch.Tensor], x: torch.Tensor, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.norm(x, w["norm.weight"], self.args.rms_norm_eps)
        lm = w.get("lm_head.weight")
        if lm is None:
            lm = embeddings["embed_tokens.weight"]
        return F.linear(h, lm)  # (B, T, vocab)
