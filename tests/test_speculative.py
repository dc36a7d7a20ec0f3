"""Speculative decoding: exactness (greedy tokens, sampled distributions), drafts, sizing, surfaces.

Greedy: tokens with a draft equal tokens without one, for every family, alone and in batches,
in stream and full mode, with the host-resident KV cache. Sampling: the distribution of what
comes out equals the target's, checked against the exact distribution computed from the
model's logits, with a total-variation bound that a correct sampler exceeds with probability
below 1e-9 (so the tests cannot flake), and shown to catch a biased variant.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import layerrun
from layerrun.engine.sampling import SamplingParams, probabilities
from layerrun.engine.speculative import (
    Children,
    SpecRow,
    SpecTotals,
    Speculator,
    Tree,
    children_from_logits,
    verify_sampled,
)
from layerrun.errors import FormatError
from layerrun.formats.convert import convert

FAMILIES = [
    "llama_gqa", "mistral", "qwen2", "gemma", "gemma2", "gemma2_layer_types", "gemma3", "gemma3_layer_types",
    "qwen3", "qwen3_sliding", "phi3", "phi3_partial", "mixtral", "qwen3_moe", "qwen3_moe_unnorm", "llama_dynamic",
]
FAIL_P = 1e-9  # chance that a correct sampler fails a distribution test


def tv_bound(n: int, outcomes: int, fail: float = FAIL_P) -> float:
    """A total variation any empirical distribution of n draws exceeds with probability <= fail:
    TV = max over events A of |P_n(A) - P(A)|; Hoeffding per event, a union over the 2^k events."""
    return math.sqrt((outcomes * math.log(2) + math.log(1 / fail)) / (2 * n))


def tv(counts: dict, probs: dict, n: int) -> float:
    keys = set(counts) | set(probs)
    return 0.5 * sum(abs(counts.get(k, 0) / n - probs.get(k, 0.0)) for k in keys)


@pytest.fixture(scope="session")
def int8_copy(tiny_hf, tmp_path_factory):
    """int8_copy(name) -> a layered int8 copy of a tiny model: a draft that mostly agrees with it."""
    cache = {}

    def get(name):
        if name not in cache:
            dst = tmp_path_factory.mktemp(f"int8_{name}") / "model"
            convert(tiny_hf(name), dst, progress=False, quantize="int8")
            cache[name] = dst
        return cache[name]

    return get


def prompts_for(vocab: int, lengths=(20, 7, 13), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


# ---- greedy: token for token ------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_equal_without_draft(name, tiny_layered, int8_copy):
    """An int8 copy as draft (mostly accepted) and n-gram lookup (mostly rejected), fixed 8-node trees
    so every pass verifies a real tree; alone and as a continuous batch with joins."""
    plain = layerrun.load(tiny_layered(name), mode="stream", prefetch=1)
    V = plain.args.vocab_size
    lengths = (6, 3, 9) if name == "llama_dynamic" else (20, 7, 13)  # dynamic NTK: speculation below position 16
    prompts = prompts_for(V, lengths, seed=len(name))
    n_new = 9 if name == "llama_dynamic" else 20
    want = [plain.generate(p, max_new_tokens=n_new, ignore_eos=True).token_ids for p in prompts]
    plain.close()
    for draft in (int8_copy(name), "ngram"):
        kv = "host" if name in ("gemma2", "qwen3_moe", "phi3") else "auto"
        eng = layerrun.load(tiny_layered(name), mode="stream", prefetch=1, draft=draft, draft_nodes=8,
                            draft_fixed=True, kv_cache=kv)
        alone = [eng.generate(p, max_new_tokens=n_new, ignore_eos=True) for p in prompts]
        assert [g.token_ids for g in alone] == want, draft
        batch = eng.generate_batch(prompts, max_new_tokens=n_new, ignore_eos=True, batch_size=2)
        assert [g.token_ids for g in batch] == want, draft
        drafted = sum(g.stats.draft_tokens for g in alone)
        accepted = sum(g.stats.accepted_tokens for g in alone)
        assert drafted > 0 and 0 <= accepted <= drafted
        if draft != "ngram" and name != "llama_dynamic":
            assert accepted > 0
            assert max(g.stats.tokens_per_pass for g in alone) > 1.5
        eng.close()


def test_phi3_trees_stop_before_the_longrope_switch(tiny_layered, int8_copy):
    """Trees never span position 24 (where Phi-3 switches RoPE factors and recomputes the cache);
    rows crossing it inside a batch still equal plain decoding."""
    plain = layerrun.load(tiny_layered("phi3"), mode="stream")
    prompts = prompts_for(plain.args.vocab_size, (18, 22, 5), seed=3)
    want = [plain.generate(p, max_new_tokens=14, ignore_eos=True).token_ids for p in prompts]
    eng = layerrun.load(tiny_layered("phi3"), mode="stream", draft=int8_copy("phi3"), draft_nodes=6, draft_fixed=True)
    got = eng.generate_batch(prompts, max_new_tokens=14, ignore_eos=True, batch_size=3)
    assert [g.token_ids for g in got] == want


def test_full_mode_and_early_stop(tiny_layered, int8_copy):
    """Full mode; a stop string or end-of-sequence inside an accepted path ends the sequence there."""
    plain = layerrun.load(tiny_layered("llama_gqa"), mode="full")
    eng = layerrun.load(tiny_layered("llama_gqa"), mode="full", draft=int8_copy("llama_gqa"), draft_nodes=8,
                        draft_fixed=True)
    p = prompts_for(320)[0]
    g0 = plain.generate(p, max_new_tokens=24, ignore_eos=True)
    g1 = eng.generate(p, max_new_tokens=24, ignore_eos=True)
    assert g1.token_ids == g0.token_ids and g1.text == g0.text
    stop = g0.text[len(g0.text) // 2 : len(g0.text) // 2 + 3]
    s0 = plain.generate(p, max_new_tokens=24, ignore_eos=True, stop=[stop])
    s1 = eng.generate(p, max_new_tokens=24, ignore_eos=True, stop=[stop])
    assert (s1.text, s1.finish_reason) == (s0.text, s0.finish_reason) == (s0.text, "stop")
    chunks = list(eng.stream(p, max_new_tokens=24, ignore_eos=True))
    assert "".join(c.text for c in chunks) == g0.text
    assert [c.token_id for c in chunks if c.token_id is not None] == g0.token_ids
    assert [c.index for c in chunks[:-1]] == list(range(24))


def test_speculate_false_per_call(tiny_layered, int8_copy):
    eng = layerrun.load(tiny_layered("qwen2"), draft=int8_copy("qwen2"), draft_nodes=4, draft_fixed=True)
    g = eng.generate([5, 6, 7], max_new_tokens=8, ignore_eos=True, speculate=False)
    assert (g.stats.draft_tokens, g.stats.passes, g.stats.tokens_per_pass) == (0, 8, 1.0)
    both = eng.generate_batch([{"prompt": [5, 6, 7], "speculate": False}, [5, 6, 7]], max_new_tokens=8,
                              ignore_eos=True)
    assert both[0].token_ids == both[1].token_ids == g.token_ids
    assert both[0].stats.draft_tokens == 0 and both[1].stats.draft_tokens > 0


def test_processors_and_logprobs_along_the_verified_path(tiny_layered, int8_copy):
    """Penalties, a grammar (structured output) and logprobs with a draft: the processors see the
    calls plain decoding makes, so tokens, text and logprobs equal decoding without the draft."""
    pytest.importorskip("llguidance")
    point = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                              "y": {"type": "integer", "minimum": 0, "maximum": 9}},
             "required": ["x", "y"], "additionalProperties": False}
    plain = layerrun.load(tiny_layered("qwen2"), mode="full")
    eng = layerrun.load(tiny_layered("qwen2"), mode="full", draft=int8_copy("qwen2"), draft_nodes=8, draft_fixed=True)
    cases = [dict(repetition_penalty=1.5, frequency_penalty=0.5, logprobs=3),
             dict(json_schema=point, logprobs=2),
             dict(json_schema=point, temperature=0.8, seed=3)]
    for kw in cases:
        want = plain.generate("Where?", max_new_tokens=24, **kw)
        got = eng.generate("Where?", max_new_tokens=24, **kw)
        if kw.get("temperature"):  # sampled: the same grammar holds (the draws differ)
            assert json.loads(got.text).keys() == {"x", "y"}
            continue
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason), kw
        assert len(got.logprobs) == len(want.logprobs)
        for (a, ta), (b, tb) in zip(got.logprobs, want.logprobs):
            assert abs(a - b) < 1e-4 and [t for t, _ in ta] == [t for t, _ in tb]
        assert got.stats.draft_tokens > 0


# ---- sampling: the target's distribution -------------------------------------------------------------


def _row(params: SamplingParams, gen: torch.Generator) -> SpecRow:
    return SpecRow(0, [0], 4, 8, params, gen)


def test_rejection_sampling_over_siblings_matches_the_target():
    """One node, four children drawn without replacement from q: what verification emits is
    distributed as p (and as p restricted by top-k); deterministic top-4 children are not."""
    V = 6
    p_logits = torch.tensor([2.0, 1.5, 0.2, -0.5, 1.0, -1.0])
    q_logits = torch.tensor([0.5, 2.0, 1.5, -1.0, 0.0, 1.0])  # a draft that disagrees with the target
    n = 40_000
    bound = tv_bound(n, V)
    for params in (SamplingParams(1.0), SamplingParams(0.8, top_k=3)):
        p = probabilities(p_logits, params)
        want = {i: float(p[i]) for i in range(V)}
        gen = torch.Generator().manual_seed(1)
        counts = {"exact": {}, "biased": {}}
        for _ in range(n):
            row = _row(params, gen)
            ch = children_from_logits(q_logits, row, k=4)
            for kind in counts:
                tree = Tree.root(0)
                if kind == "biased":  # deterministic top-4 treated as draws: what SpecExec trees would give
                    ch = Children(torch.topk(ch.dist, 4).indices.tolist(), [1.0] * 4, [1.0] * 4, ch.dist)
                for t in ch.tokens:
                    tree.add(t, 0, 1.0, 1.0)
                tree.dist[0] = ch.dist
                path, tok, _ = verify_sampled(tree, lambda u, p=p: p, gen)
                first = (tree.path_tokens(path) + [tok])[0]
                counts[kind][first] = counts[kind].get(first, 0) + 1
        assert tv(counts["exact"], want, n) < bound, (params, counts["exact"])
        if params.top_k == 0:
            assert tv(counts["biased"], want, n) > bound  # the test sees a biased tree


def test_rejection_sampling_two_levels_and_point_masses():
    """A depth-2 tree (model-draft children at the root, n-gram point masses below): the first two
    emitted tokens are distributed as p(x1) p(x2 | x1)."""
    V = 4
    g0 = torch.Generator().manual_seed(7)
    p1 = torch.softmax(torch.randn(V, generator=g0), -1)
    p2 = torch.softmax(torch.randn(V, V, generator=g0), -1)  # p2[x1]
    q1 = torch.randn(V, generator=g0)
    want = {(a, b): float(p1[a] * p2[a, b]) for a in range(V) for b in range(V)}
    params = SamplingParams(1.0)
    n = 40_000
    gen = torch.Generator().manual_seed(2)
    counts: dict = {}
    for _ in range(n):
        ch = children_from_logits(q1, _row(params, gen), k=2)
        tree = Tree.root(0)
        for t in ch.tokens:
            tree.add(t, 0, 1.0, 1.0)
        tree.dist[0] = ch.dist
        for c in list(tree.children[0]):
            for t in ((tree.tokens[c] + 1) % V, (tree.tokens[c] + 2) % V):  # point-mass children
                tree.add(t, c, 1.0, 1.0)

        def probs(u, tree=tree):
            return p1 if u == 0 else p2[tree.tokens[u]]

        path, tok, _ = verify_sampled(tree, probs, gen)
        toks = tree.path_tokens(path) + [tok]
        if len(toks) == 1:  # nothing accepted: the second token comes from the next step, p2[x1]
            toks.append(int(torch.multinomial(p2[toks[0]], 1, generator=gen)))
        key = tuple(toks[:2])
        counts[key] = counts.get(key, 0) + 1
    assert tv(counts, want, n) < tv_bound(n, V * V)


def _exact_distribution(eng, prompt: list[int], steps: int, params: SamplingParams) -> dict:
    """P(first `steps` tokens) of the model, from its logits (each prefix run as a plain sequence)."""
    out = {(): 1.0}
    for _ in range(steps):
        nxt = {}
        for seq, pr in out.items():
            p = probabilities(eng.logits([prompt + list(seq)])[0, -1], params)
            for t in (p > 0).nonzero()[:, 0].tolist():
                nxt[seq + (t,)] = pr * float(p[t])
        out = nxt
    return out


@pytest.mark.parametrize("draft", ["int4", "ngram"])
def test_sampled_sequences_have_the_target_distribution(draft, tiny_hf, tiny_layered, tmp_path):
    """Three sampled tokens (top-k 2: 8 possible sequences) over many seeds, drafted by an int4 copy
    (children drawn without replacement; about a fifth accepted) or by n-gram lookup (point
    masses), 6-node trees, 64 rows batched together: the empirical distribution is within the
    bound of the exact one computed from the logits; so is plain sampling's."""
    target = tiny_layered("llama_gqa")
    if draft == "int4":
        d = tmp_path / "int4"
        convert(tiny_hf("llama_gqa"), d, progress=False, quantize="int4")
    else:
        d = "ngram"
    eng = layerrun.load(target, mode="full", draft=d, draft_nodes=6, draft_fixed=True, batch_size=64)
    prompt = [5, 9, 17, 5, 9, 17, 5, 9]  # repeats, so n-gram lookup proposes
    params = SamplingParams(1.3, top_k=2)
    want = _exact_distribution(eng, prompt, 3, params)
    n = 1500
    bound = tv_bound(n, len(want))
    for speculate in (True, False) if draft == "int4" else (True,):
        gens = eng.generate_batch(
            [{"prompt": prompt, "seed": s} for s in range(n)], max_new_tokens=4, ignore_eos=True,
            temperature=1.3, top_k=2, speculate=speculate, batch_size=64,
        )
        counts: dict = {}
        for g in gens:
            counts[tuple(g.token_ids[:3])] = counts.get(tuple(g.token_ids[:3]), 0) + 1
        assert tv(counts, want, n) < bound, (speculate, bound)
        if speculate:
            drafted = sum(g.stats.draft_tokens for g in gens)
            accepted = sum(g.stats.accepted_tokens for g in gens)
            assert drafted > n // 5 and 0.05 * drafted < accepted < 0.95 * drafted  # both outcomes were exercised


# ---- drafts, sizing -------------------------------------------------------------------------------------


def test_draft_with_another_tokenizer_is_one_clear_error(tiny_layered):
    with pytest.raises(FormatError) as e:
        layerrun.load(tiny_layered("llama_gqa"), draft=tiny_layered("gemma"))
    msg = str(e.value)
    assert msg.startswith(f"--draft {tiny_layered('gemma')}: its tokenizer differs from the model's (321 tokens, "
                          "the model has 320)") and "\n" not in msg
    p = subprocess.run([sys.executable, "-m", "layerrun", "generate", str(tiny_layered("llama_gqa")), "hi",
                        "--draft", str(tiny_layered("gemma"))], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.startswith("error: --draft ") and "Traceback" not in p.stderr
    with pytest.raises(FormatError, match="no such model folder"):
        layerrun.load(tiny_layered("llama_gqa"), draft="/nonexistent/draft")


def test_ngram_draft_proposes_what_followed_before():
    from layerrun.engine.draft import NgramSession

    s = NgramSession()
    s.add_rows(1)
    seq = [1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 7, 8, 1, 2, 3]
    row = SpecRow(0, seq, 3, 8, SamplingParams(), None)
    root = s.start([row])[0]
    assert root.tokens == [4] and root.feature == [1.0]  # "1 2 3" was followed by 4, twice
    tree = Tree.root(3)
    x = tree.add(4, 0, 1.0, 1.0)
    below = s.expand([row], [tree], [(0, x)])[0]
    assert sorted(below.tokens) == [5, 7] and sorted(below.feature) == [0.5, 0.5]  # then 5 once, 7 once


class _FreeSession:
    """A draft session whose every node has the same two children; its forwards cost what we say."""

    forwards = 0
    rows = 1

    def __init__(self, forward_s: float):
        self.forward_s = forward_s

    def pending_tokens(self, r):
        return 1

    def cost(self, per_row):
        return self.forward_s if per_row else 0.0

    def start(self, rows):
        return [Children([1, 2], [0.9, 0.05], [0.9, 0.05]) for _ in rows]

    def expand(self, rows, trees, items):
        return [Children([1, 2], [0.9, 0.05], [0.9, 0.05]) for _ in items]

    def commit(self, *a):
        pass


def _sized_tree(io_s: float, compute_s: float, forward_s: float) -> int:
    spec = Speculator(type("D", (), {"describe": lambda self: "test", "cost": None})(), max_nodes=64)
    spec.target.io = io_s
    for n in (1, 2, 4):  # compute a + b n
        spec.target.compute.observe(n, compute_s * (1 + 0.01 * n))
    spec.continues["greedy"] = 0.9
    row = SpecRow(0, [0], 32, 64, SamplingParams(), None)
    return len(spec.propose(_FreeSession(forward_s), [row], 1, SpecTotals())[0]) - 1


def test_tree_size_follows_the_cost_of_a_pass():
    """A pass streamed from disk (seconds) gets a big tree; a resident one (milliseconds) with a draft
    as costly as itself gets none; a cheap draft beside a resident target gets a short chain."""
    streamed = _sized_tree(io_s=3.0, compute_s=0.01, forward_s=0.01)
    resident_slow_draft = _sized_tree(io_s=0.0, compute_s=0.01, forward_s=0.012)
    resident_cheap_draft = _sized_tree(io_s=0.0, compute_s=0.04, forward_s=0.004)
    assert streamed >= 30
    assert resident_slow_draft == 0
    assert 1 <= resident_cheap_draft < streamed


# ---- surfaces: CLI, stats, trace, server ----------------------------------------------------------------


def test_cli_draft_json_stats_trace_explain(tiny_layered, int8_copy, tmp_path):
    path = tiny_layered("llama_gqa")
    trace = tmp_path / "t.json"
    base = [sys.executable, "-m", "layerrun", "generate", str(path), "Hello there", "--raw", "--max-new-tokens", "12",
            "--ignore-eos", "--json"]
    p = subprocess.run(base + ["--draft", str(int8_copy("llama_gqa")), "--draft-nodes", "6", "--draft-fixed",
                               "--stats", "--explain", "--trace", str(trace)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    st = out["stats"]
    for k in ("passes", "tokens_per_pass", "draft_tokens", "accepted_tokens", "draft_s", "verify_s"):
        assert k in st
    assert st["passes"] < 12 and st["tokens_per_pass"] > 1 and st["accepted_tokens"] > 0
    assert "speculation: " in p.stderr and "tokens per pass" in p.stderr
    # --explain states the sizing rule and the draft it works with
    assert "token trees of a fixed 6 nodes per row" in p.stderr and "draft forward = a + b*tokens" in p.stderr
    assert "target pass = max(disk read per pass, a + b*tokens)" in p.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "draft" for e in events) and any(e.get("cat") == "verify" for e in events)
    plain = subprocess.run(base + ["--draft", "ngram", "--no-speculate"], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    st0 = json.loads(plain.stdout)
    assert st0["token_ids"] == out["token_ids"] and st0["stats"]["draft_tokens"] == 0
    assert st0["stats"]["tokens_per_pass"] == 1.0


def test_server_speculates_by_default_and_counts(tiny_layered, int8_copy):
    pytest.importorskip("fastapi")
    import httpx

    from layerrun.server import running_server

    eng = layerrun.load(tiny_layered("llama_gqa"), draft=int8_copy("llama_gqa"), draft_nodes=6, draft_fixed=True)
    plain = layerrun.load(tiny_layered("llama_gqa")).generate([5, 6, 7, 8], max_new_tokens=10, ignore_eos=True)
    with running_server(eng, batch_size=4, model_name="tiny") as s:
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        r1 = httpx.post(f"{s.base_url}/completions", json=body, timeout=60).json()
        m1 = httpx.get(s.url + "/metrics").text
        r2 = httpx.post(f"{s.base_url}/completions", json={**body, "speculate": False}, timeout=60).json()
        m2 = httpx.get(s.url + "/metrics").text

    def counter(text, name):
        return float(next(x for x in text.splitlines() if x.startswith(name + " ")).split()[1])

    assert r1["choices"][0]["token_ids"] == r2["choices"][0]["token_ids"] == plain.token_ids
    drafted = counter(m1, "layerrun_spec_decode_draft_tokens_total")
    accepted = counter(m1, "layerrun_spec_decode_accepted_tokens_total")
    assert drafted > 0 and 0 < accepted <= drafted
    assert counter(m2, "layerrun_spec_decode_draft_tokens_total") == drafted  # the opted-out request drafted none
    assert counter(m2, "layerrun_generation_tokens_total") == 20
    assert f'vllm:spec_decode_num_draft_tokens_total{{model_name="tiny"}} {drafted}' in m1


def test_serve_draft_flag_is_the_server_default(tiny_layered, int8_copy):
    """`layerrun serve MODEL --draft D`: the real command says its rule, speculates by default, and a
    request's ``speculate: false`` opts out; tokens are those of decoding without a draft."""
    import os
    import signal
    import socket
    import time

    httpx = pytest.importorskip("httpx")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    path = tiny_layered("llama_gqa")
    plain = layerrun.load(path).generate([5, 6, 7, 8], max_new_tokens=10, ignore_eos=True).token_ids
    cmd = [sys.executable, "-m", "layerrun", "serve", str(path), "--port", str(port), "--log-level", "warning",
           "--draft", str(int8_copy("llama_gqa")), "--draft-nodes", "5", "--draft-fixed"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "LAYERRUN_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert p.poll() is None, p.stderr.read()
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 10, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        r1 = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        r2 = httpx.post(url + "/v1/completions", json={**body, "speculate": False}, timeout=60).json()
        metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    assert r1["choices"][0]["token_ids"] == r2["choices"][0]["token_ids"] == plain
    drafted = next(float(x.split()[1]) for x in metrics.splitlines()
                   if x.startswith("layerrun_spec_decode_draft_tokens_total "))
    assert 0 < drafted <= 5 * 10  # the first request drafted (5 nodes a step at most), the second none
    assert "speculation: draft " in err and "a fixed 5 nodes per row" in err
