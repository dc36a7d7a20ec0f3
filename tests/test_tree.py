"""Token-tree passes (speculative decoding's verification): every family, against plain sequences.

A tree pass feeds each row a token tree (root + drafted nodes, parents before children) at
positions root + depth, each node seeing the cache plus its ancestors. Its logits at every node
must equal the logits of running that node's root-to-node path as a plain sequence, in a batch
of rows of different lengths with padding (fp32). After verification the KV cache keeps one path
per row (compacted to the front of the block); the next step must again equal plain sequences.
"""

from __future__ import annotations

import pytest
import torch

import layerrun
from layerrun.engine.lane import Lane
from layerrun.engine.telemetry import GenerationStats

CASES = [
    "llama_gqa", "mistral", "qwen2", "gemma", "gemma2", "gemma2_layer_types", "gemma3", "gemma3_layer_types",
    "qwen3", "qwen3_sliding", "phi3", "phi3_partial", "mixtral", "qwen3_moe", "qwen3_moe_unnorm", "llama_dynamic",
]
# A tree pass multiplies more rows at once than the plain sequence does, and the kernels' blocking (so the
# order of a sum) depends on the row count and the CPU: 2.0e-5 was seen on gemma3 / stream on an AVX-512
# Xeon. Still 5x tighter than the engine's bar against transformers (1e-4).
TOL = 5e-5


def random_tree(n: int, g: torch.Generator) -> list[int]:
    """Parents of an n-node tree in topological order (node 0 is the root)."""
    return [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]


def ancestors(parents: list[int]) -> torch.Tensor:
    """(n, n) bool: [i, j] = j is i or one of its ancestors."""
    n = len(parents)
    a = torch.zeros((n, n), dtype=torch.bool)
    for i, p in enumerate(parents):
        a[i, i] = True
        if p >= 0:
            a[i] |= a[p]
    return a


def depth(parents: list[int]) -> list[int]:
    d = []
    for p in parents:
        d.append(0 if p < 0 else d[p] + 1)
    return d


def path(parents: list[int], i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


def block(feeds: list[list[int]], starts: list[int], trees: list[list[int] | None]):
    """ids, positions (-1 = padding) and the (B, T, T) tree of one right-aligned block."""
    B, T = len(feeds), max(len(f) for f in feeds)
    ids = torch.zeros((B, T), dtype=torch.long)
    pos = torch.full((B, T), -1, dtype=torch.long)
    tree = torch.zeros((B, T, T), dtype=torch.bool)
    for b, (f, s, par) in enumerate(zip(feeds, starts, trees)):
        n = len(f)
        par = par if par is not None else [i - 1 for i in range(n)]  # a chain
        ids[b, T - n :] = torch.tensor(f)
        pos[b, T - n :] = s + torch.tensor(depth(par))
        tree[b, T - n :, T - n :] = ancestors(par)
    return ids, pos, tree


@pytest.mark.parametrize("mode", ["stream", "full"])  # full: resident layers fused (qkv, gate/up) for oneDNN
@pytest.mark.parametrize("name", CASES)
def test_tree_pass_equals_plain_paths(name, mode, tiny_layered):
    kv = "host" if name in ("gemma3", "qwen3_moe") and mode == "stream" else "auto"  # the host cache's gather too
    eng = layerrun.load(tiny_layered(name), mode=mode, prefetch=1, kv_cache=kv)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    V = eng.args.vocab_size
    lengths = (7, 4) if name == "llama_dynamic" else (13, 7)  # dynamic NTK: trees stay below position 16
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in lengths]
    lane = Lane(eng)
    lane.add_rows(2)
    stats = GenerationStats()
    ids, pos, _ = block(prompts, [0, 0], [None, None])
    lane.forward(ids, pos, stats)  # prefill, left-padded

    parents = [random_tree(9, g), random_tree(6, g)]
    tokens = [torch.randint(3, V, (len(p),), generator=g).tolist() for p in parents]
    ids, pos, tree = block(tokens, list(lengths), parents)
    T = ids.shape[1]
    valid = (pos >= 0).reshape(-1).nonzero()[:, 0]
    start = lane.width
    got = lane.forward(ids, pos, stats, tree=tree, select=valid)  # (N, V)
    k = 0
    for b in range(2):
        for i in range(len(parents[b])):
            seq = prompts[b] + [tokens[b][j] for j in path(parents[b], i)]
            want = eng.logits([seq])[0, -1]
            assert (got[k] - want).abs().max().item() < TOL, (b, i)
            k += 1
    assert want.abs().max().item() > 0.5

    # keep one path per row (the deepest node's; the first child's) and decode one more token each
    keep_node = [max(range(9), key=lambda i: depth(parents[0])[i]), 1]
    kept = [path(parents[b], keep_node[b]) for b in range(2)]
    lane.keep_columns(start, [[T - len(parents[b]) + j for j in kept[b]] for b in range(2)])
    assert lane.width == start + max(len(p) for p in kept)  # the cache grew by the longest kept path
    assert eng.new_cache is not None and lane.cache.length == lane.width
    nxt = torch.randint(3, V, (2,), generator=g).tolist()
    ids, pos, _ = block([[t] for t in nxt], [lengths[b] + len(kept[b]) for b in range(2)], [None, None])
    got = lane.forward(ids, pos, stats)[:, -1]
    for b in range(2):
        seq = prompts[b] + [tokens[b][j] for j in kept[b]] + [nxt[b]]
        assert (got[b] - eng.logits([seq])[0, -1]).abs().max().item() < TOL, b
    eng.close()


def test_tree_depth_limits():
    """Families whose pass depends on the step's furthest position limit a tree's depth."""
    from layerrun.models import build_model

    base = dict(hidden_size=64, num_hidden_layers=1, intermediate_size=128, num_attention_heads=4, vocab_size=320)
    llama = build_model({**base, "model_type": "llama"})
    dyn = build_model({**base, "model_type": "llama", "max_position_embeddings": 16,
                       "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    phi = build_model({**base, "model_type": "phi3", "original_max_position_embeddings": 24, "max_position_embeddings": 96,
                       "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}})
    assert llama.max_tree_depth(1000) is None
    assert dyn.max_tree_depth(10) == 5 and dyn.max_tree_depth(15) == 0 and dyn.max_tree_depth(40) == 0
    assert phi.max_tree_depth(20) == 3 and phi.max_tree_depth(23) == 0 and phi.max_tree_depth(24) is None
