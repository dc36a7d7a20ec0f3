"""Mixture-of-experts models (Mixtral, Qwen 3 MoE) in stream mode read only the experts each step routes to.

The reference for "which experts" is transformers' own router (``output_router_logits``):
the bytes the engine reports reading must equal, exactly, the attention/router part of
every layer plus the experts transformers routes to at each forward step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import layerrun
from layerrun.io.pipeline import tensor_ranges
from layerrun.models.base import expert_index

MODEL = "mixtral"
MOE = ["mixtral", "qwen3_moe"]


def _ids(n: int, seed: int, vocab: int = 317) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _expert_bytes(entry) -> tuple[int, dict[int, int]]:
    dense, per = 0, {}
    for name, t in entry.tensors.items():
        j = expert_index(name)
        if j is None:
            dense += t.nbytes
        else:
            per[j] = per.get(j, 0) + t.nbytes
    return dense, per


@pytest.mark.parametrize("name", MOE)
def test_layer_file_keeps_each_expert_contiguous_after_the_dense_part(name, tiny_layered):
    eng = layerrun.load(tiny_layered(name), mode="full")
    for i in range(eng.args.num_hidden_layers):
        entry = eng.manifest.layer(i)
        dense = [n for n in entry.tensors if expert_index(n) is None]
        assert tensor_ranges(entry, dense) == [(entry.data_start, tensor_ranges(entry, dense)[0][1])]
        ends = tensor_ranges(entry, dense)[0][1]
        for j in range(eng.model.n_experts):
            r = tensor_ranges(entry, [n for n in entry.tensors if expert_index(n) == j])
            assert len(r) == 1 and r[0][0] >= ends  # one read per expert, after attention + router


@pytest.mark.parametrize("name,reader", [(m, r) for m in MOE for r in ("pread", "direct", "mmap")])
def test_stream_reads_exactly_the_routed_experts(name, reader, tiny_hf, tiny_layered):
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_hf(name), dtype=torch.float32, experts_implementation="eager").eval()
    ref.generation_config.eos_token_id = None
    prompt = _ids(2, seed=4)
    n_new = 12
    eng = layerrun.load(tiny_layered(name), mode="stream", reader=reader, prefetch=2)
    full = layerrun.load(tiny_layered(name), mode="full")
    got = eng.generate(prompt, max_new_tokens=n_new, ignore_eos=True)
    assert got.token_ids == full.generate(prompt, max_new_tokens=n_new, ignore_eos=True).token_ids
    with torch.no_grad():
        want_ids = ref.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        assert want_ids[0, len(prompt):].tolist() == got.token_ids
        # The engine ran a prefill over the prompt and one step per generated token but the last.
        seq = want_ids[:, : len(prompt) + n_new - 1]
        router = ref(seq, output_router_logits=True).router_logits  # per layer: (T, experts)
    k = eng.model.top_k
    steps = [range(0, len(prompt))] + [range(t, t + 1) for t in range(len(prompt), seq.shape[1])]
    want_bytes = want_expert = want_loads = 0
    for i, logits in enumerate(router):
        dense, per = _expert_bytes(eng.manifest.layer(i))
        top = logits.topk(k, dim=-1).indices
        for rows in steps:
            hit = set(top[list(rows)].flatten().tolist())
            want_bytes += dense + sum(per[j] for j in hit)
            want_expert += sum(per[j] for j in hit)
            want_loads += len(hit)
    s = got.stats
    assert s.expert_bytes_read == want_expert
    assert s.bytes_read == want_bytes
    assert s.experts_read == want_loads
    n_layers, n_exp = eng.args.num_hidden_layers, eng.model.n_experts
    assert s.experts_total == len(steps) * n_layers * n_exp
    total_expert = sum(sum(_expert_bytes(eng.manifest.layer(i))[1].values()) for i in range(n_layers))
    assert s.expert_bytes_read + s.expert_bytes_skipped == len(steps) * total_expert
    assert s.expert_bytes_skipped > 0.4 * len(steps) * total_expert  # top-2 of 6 / top-3 of 8 per decode step


def test_all_experts_option_reads_whole_layers(tiny_layered):
    eng = layerrun.load(tiny_layered(MODEL), mode="stream", experts="all")
    routed = layerrun.load(tiny_layered(MODEL), mode="stream")
    prompt = _ids(5, seed=2)
    a = eng.generate(prompt, max_new_tokens=6, ignore_eos=True)
    b = routed.generate(prompt, max_new_tokens=6, ignore_eos=True)
    assert a.token_ids == b.token_ids
    layers = sum(eng.manifest.layer(i).bytes - eng.manifest.layer(i).data_start for i in range(eng.args.num_hidden_layers))
    assert a.stats.bytes_read == a.stats.steps * layers
    assert a.stats.experts_total == 0
    assert b.stats.bytes_read < a.stats.bytes_read


def test_partial_mode_streams_some_layers_with_routed_reads(tiny_layered):
    path = tiny_layered(MODEL)
    full = layerrun.load(path, mode="full")
    eng = layerrun.load(path, mode="partial")  # with room to spare: all layers but the last resident
    assert eng.plan.resident and eng.plan.streamed
    assert set(eng.expert_groups) == set(eng.plan.streamed)
    prompt = _ids(7, seed=3)
    got = eng.generate(prompt, max_new_tokens=10, ignore_eos=True)
    assert got.token_ids == full.generate(prompt, max_new_tokens=10, ignore_eos=True).token_ids
    assert got.stats.experts_total == got.stats.steps * len(eng.plan.streamed) * eng.args.num_local_experts


def test_batch_in_stream_mode_matches_each_prompt_alone(tiny_layered):
    eng = layerrun.load(tiny_layered(MODEL), mode="stream", batch_size=4)
    full = layerrun.load(tiny_layered(MODEL), mode="full")
    prompts = [_ids(n, seed=n) for n in (3, 9, 5)]
    outs = eng.generate_batch(prompts, max_new_tokens=8, ignore_eos=True, batch_size=2)
    for p, o in zip(prompts, outs):
        assert o.token_ids == full.generate(p, max_new_tokens=8, ignore_eos=True).token_ids
    assert sum(o.stats.expert_bytes_skipped for o in outs) > 0


def test_int8_mixtral_streams_routed_experts(tiny_hf, tmp_path):
    from layerrun.formats.convert import convert

    dst = tmp_path / "q8"
    convert(tiny_hf(MODEL), dst, progress=False, quantize="int8")
    full = layerrun.load(dst, mode="full")
    eng = layerrun.load(dst, mode="stream")
    prompt = _ids(4, seed=5)
    got = eng.generate(prompt, max_new_tokens=10, ignore_eos=True)
    assert got.token_ids == full.generate(prompt, max_new_tokens=10, ignore_eos=True).token_ids
    assert 0 < got.stats.expert_bytes_read < got.stats.expert_bytes_read + got.stats.expert_bytes_skipped


def test_bf16_top1_mixtral_matches_transformers(tiny_hf, tiny_layered):
    """Top-1 routing, tied embeddings, head_dim 24 != 64/4, a bf16 checkpoint computed in bf16."""
    name = "mixtral_top1_bf16"
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_hf(name), dtype=torch.bfloat16, experts_implementation="eager").eval()
    eng = layerrun.load(tiny_layered(name), mode="stream")
    assert eng.dtype == torch.bfloat16
    ids = torch.tensor([_ids(24, seed=9, vocab=320)])
    with torch.no_grad():
        want = ref(ids).logits.float()
    got = eng.logits(ids)
    assert (got - want).abs().max().item() < 2e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() > 0.9


@pytest.mark.parametrize("name", MOE)
def test_validate_reference_passes_on_moe_models(name, tiny_layered):
    """validate --reference rebuilds transformers' fused expert tensors from the per-expert files."""
    r = subprocess.run(
        [sys.executable, "-m", "layerrun", "validate", str(tiny_layered(name)), "--reference", "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["ok"] is True
    names = [c["name"] for c in rep["checks"]]
    assert "greedy 16 tokens" in names and any(n.startswith("hidden: layer 1") for n in names)


def test_cli_stats_report_expert_bytes_saved(tiny_layered):
    path = tiny_layered(MODEL)
    r = subprocess.run(
        [sys.executable, "-m", "layerrun", "generate", str(path), "Hello world", "--mode", "stream",
         "--max-new-tokens", "6", "--ignore-eos", "--stats", "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert stats["expert_bytes_skipped"] > 0 and stats["experts_read"] < stats["experts_total"]
    assert "experts (routed reads)" in r.stderr and "never read" in r.stderr


def test_steps_that_route_to_nearly_every_expert_read_whole_layers_ahead(tiny_layered):
    """8 rows x top-2 of 6 experts: 1 - (4/6)^8 = 96% expected hit, so decode steps stage whole layers
    (prefetched behind compute) instead of waiting on expert reads after routing."""
    eng = layerrun.load(tiny_layered(MODEL), mode="stream", batch_size=8)
    full = layerrun.load(tiny_layered(MODEL), mode="full")
    prompts = [_ids(3, seed=20 + r) for r in range(8)]
    bg = eng.batch_generator(8)
    reqs = [bg.request(p, max_new_tokens=5, ignore_eos=True) for p in prompts]
    layer_bytes = sum(eng.manifest.layer(i).bytes - eng.manifest.layer(i).data_start for i in range(eng.args.num_hidden_layers))
    per_step = []
    while bg.busy:
        bg.step()
        per_step.append(bg.last_stats)
    s = per_step[3]  # a decode step well after the switch
    assert s.bytes_read == layer_bytes
    assert s.experts_read == s.experts_total and s.expert_bytes_skipped == 0
    for p, r in zip(prompts, reqs):
        assert r.token_ids == full.generate(p, max_new_tokens=5, ignore_eos=True).token_ids
    one = layerrun.load(tiny_layered(MODEL), mode="stream")
    g = one.generate(prompts[0], max_new_tokens=5, ignore_eos=True)
    assert g.stats.expert_bytes_skipped > 0  # a single sequence still reads only its routed experts


def test_server_metrics_count_expert_bytes_never_read(tiny_layered):
    pytest.importorskip("fastapi")
    import httpx

    from layerrun.server import running_server

    eng = layerrun.load(tiny_layered(MODEL), mode="stream")
    with running_server(eng, model_name="mix") as s:
        r = httpx.post(s.url + "/v1/completions", timeout=300,
                       json={"model": "mix", "prompt": "Hello", "max_tokens": 6, "ignore_eos": True})
        assert r.status_code == 200, r.text
        text = httpx.get(s.url + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("layerrun_expert_bytes_skipped_total"))
    assert float(line.split()[-1]) > 0


def test_qwen3_moe_config_spellings():
    """Released Qwen3-MoE configs say num_experts (transformers 4); transformers 5 writes num_local_experts."""
    from layerrun.errors import UnsupportedModelError
    from layerrun.models import build_model

    common = dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=320, moe_intermediate_size=32,
                  num_experts_per_tok=4, norm_topk_prob=True)
    v4 = build_model({**common, "num_experts": 16, "rope_theta": 1e6, "decoder_sparse_step": 1, "mlp_only_layers": []})
    v5 = build_model({**common, "num_local_experts": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    for m in (v4, v5):
        assert (m.n_experts, m.top_k, m.args.rope_theta) == (16, 4, 1e6)
        assert len([n for n in m.expected_tensors()["layer"] if expert_index(n) is not None]) == 3 * 16
    with pytest.raises((NotImplementedError, UnsupportedModelError), match="mlp_only_layers"):
        build_model({**common, "num_experts": 16, "mlp_only_layers": [0]})


@pytest.mark.parametrize("name", MOE)
def test_inspect_reports_active_parameters_and_bytes_per_token(name, tiny_hf, tiny_layered):
    from layerrun.formats.inspect import inspect_path

    info = inspect_path(tiny_layered(name))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf(name), dtype=torch.float32)
    E, k = info["experts"], info["experts_per_token"]
    total = sum(p.numel() for p in ref.parameters())
    expert = sum(p.numel() for n, p in ref.named_parameters() if ".experts." in n)
    assert info["parameters"] == total
    assert info["active_parameters"] == total - expert + expert * k // E
    # a decode step of one sequence reads exactly this in stream mode: attention + router + k experts per layer
    eng = layerrun.load(tiny_layered(name), mode="stream")
    bg = eng.batch_generator(1)
    bg.request(_ids(4, seed=1), max_new_tokens=3, ignore_eos=True)
    bg.step()
    bg.step()
    assert bg.last_stats.bytes_read == info["bytes_stream_per_token"]


@pytest.fixture(scope="module")
def medium_moe(tmp_path_factory):
    """A Qwen3-MoE-shaped random model with 25 MB of experts per layer, so memory budgets have room."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import synthetic_model

    synthetic_model.PRESETS.setdefault("moe_test", dict(
        model_type="qwen3_moe", hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=512, num_experts=64, num_experts_per_tok=4,
        moe_intermediate_size=128, norm_topk_prob=True))
    return synthetic_model.build(tmp_path_factory.mktemp("moe") / "m", "moe_test")


def test_partial_mode_keeps_attention_and_router_resident_before_whole_layers(medium_moe):
    """With room for every layer's attention/norms/router but not one more layer's experts, the
    governor keeps those dense parts resident and streams only routed experts."""
    import psutil

    from layerrun.engine.governor import plan_memory

    full = layerrun.load(medium_moe, mode="full")
    man, args = full.manifest, full.args
    dense = sum(t.nbytes for f in man.layers for n, t in f.tensors.items() if expert_index(n) is None)
    experts_per_layer = sum(t.nbytes for n, t in man.layer(0).tensors.items() if expert_index(n) is not None)
    stream_need = plan_memory(man, args, mode="stream", max_memory=64 * 2**30, baseline=0, context=full.context,
                              elem_bytes=4).need
    # arithmetic first, with no process baseline: dense parts fit, a whole layer's experts do not
    p = plan_memory(man, args, mode="auto", max_memory=stream_need + dense + experts_per_layer // 2, baseline=0,
                    context=full.context, elem_bytes=4, moe_dense=True)
    assert (p.mode, p.resident, p.dense_resident) == ("partial", [], [0, 1, 2, 3])
    assert any("mixture of experts" in line for line in p.lines)
    # room for two layers' experts too (a ring of one slot, so that full mode does not fit)
    need0 = plan_memory(man, args, mode="stream", max_memory=64 * 2**30, baseline=0, context=full.context,
                        elem_bytes=4, prefetch=0).need
    p = plan_memory(man, args, mode="auto", max_memory=need0 + dense + experts_per_layer * 2 + 1, baseline=0,
                    context=full.context, elem_bytes=4, moe_dense=True, prefetch=0)
    assert (p.mode, p.resident, p.dense_resident) == ("partial", [0, 1], [2, 3])
    p = plan_memory(man, args, mode="stream", max_memory=64 * 2**30, baseline=0, context=full.context, elem_bytes=4,
                    moe_dense=True)
    assert p.dense_resident == []  # stream means nothing resident
    # the engine, with a budget on top of what the process holds now (its KV cache planned for its first
    # DEFAULT_RESERVE tokens: it grows on demand)
    from layerrun.engine.governor import DEFAULT_RESERVE

    stream_need = plan_memory(man, args, mode="stream", max_memory=64 * 2**30, baseline=0, elem_bytes=4,
                              context=min(full.context, DEFAULT_RESERVE)).need
    rss = psutil.Process().memory_info().rss
    eng = layerrun.load(medium_moe, mode="partial", max_memory=rss + stream_need + dense + experts_per_layer // 2)
    assert eng.plan.dense_resident == [0, 1, 2, 3] and eng.plan.resident == []
    prompt = _ids(6, seed=2, vocab=512)
    got = eng.generate(prompt, max_new_tokens=8, ignore_eos=True)
    assert got.token_ids == full.generate(prompt, max_new_tokens=8, ignore_eos=True).token_ids
    bg = eng.batch_generator(1)
    bg.request(prompt, max_new_tokens=3, ignore_eos=True)
    bg.step()
    bg.step()  # a decode step: only the routed experts are read, nothing else
    per_expert = experts_per_layer // eng.model.n_experts
    assert bg.last_stats.bytes_read == args.num_hidden_layers * eng.model.top_k * per_expert
