"""Batched generation: each sequence's greedy tokens equal running it alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import layerrun

LENGTHS = (3, 30, 11, 7, 19)
MAX_NEW = (20, 12, 25, 5, 18)


def prompts():
    return [list(range(5 + i, 5 + i + n)) for i, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma2", "gemma3"])
@pytest.mark.parametrize("batch_size", [2, 8])
def test_batch_equals_alone_mixed_lengths_with_joins(name, batch_size, tiny_layered):
    eng = layerrun.load(tiny_layered(name), mode="stream", prefetch=1)
    alone = [eng.generate(p, max_new_tokens=n, ignore_eos=True).token_ids for p, n in zip(prompts(), MAX_NEW)]
    live = []
    bg = eng.batch_generator(batch_size)
    reqs = [bg.request(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts(), MAX_NEW)]
    while bg.busy:
        bg.step()
        live.append(len(bg.rows))
    assert [r.token_ids for r in reqs] == alone
    assert max(live) == min(batch_size, len(LENGTHS))  # the cap holds, and sequences do share steps
    if batch_size == 2:
        assert bg.steps > max(MAX_NEW)  # later prompts joined as earlier ones finished


def test_early_eos_leaves_the_batch(tiny_layered, tmp_path):
    src = tiny_layered("qwen2")
    eng0 = layerrun.load(src)
    # make a token that one sequence produces mid-way (and not before) the end-of-sequence token
    for k, p in enumerate(prompts()):
        first = eng0.generate(p, max_new_tokens=MAX_NEW[k], ignore_eos=True).token_ids
        novel = [i for i in range(2, len(first) - 1) if first[i] not in first[:i]]
        if novel:
            cut = novel[0]
            eos = first[cut]
            break
    else:
        pytest.fail("no sequence produces a new token mid-way")
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    (dst / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (dst / "config.json").write_text(json.dumps(cfg))
    eng = layerrun.load(dst, mode="stream")
    assert eng.eos_token_ids == {eos}
    alone = [eng.generate(p, max_new_tokens=n) for p, n in zip(prompts(), MAX_NEW)]
    assert alone[k].finish_reason == "stop" and alone[k].token_ids == first[:cut]
    batch = eng.generate_batch([{"prompt": p, "max_new_tokens": n} for p, n in zip(prompts(), MAX_NEW)], batch_size=3)
    assert [g.token_ids for g in batch] == [g.token_ids for g in alone]
    assert [g.finish_reason for g in batch] == [g.finish_reason for g in alone]


def test_per_sequence_sampling_and_stop(tiny_layered):
    eng = layerrun.load(tiny_layered("llama_gqa"), mode="full")
    greedy = eng.generate([5, 6, 7], max_new_tokens=12, ignore_eos=True)
    sampled = eng.generate([9, 9, 9], max_new_tokens=12, ignore_eos=True, temperature=1.0, seed=7)
    stop = greedy.text[2:4]
    stopped = eng.generate([5, 6, 7], max_new_tokens=12, ignore_eos=True, stop=[stop])
    batch = eng.generate_batch([
        {"prompt": [5, 6, 7]},
        {"prompt": [9, 9, 9], "temperature": 1.0, "seed": 7},
        {"prompt": [5, 6, 7], "stop": [stop]},
    ], max_new_tokens=12, ignore_eos=True)
    assert batch[0].token_ids == greedy.token_ids
    assert batch[1].token_ids == sampled.token_ids
    assert batch[2].text == stopped.text and batch[2].finish_reason == "stop"


def test_one_layer_load_serves_the_batch(tiny_layered):
    eng = layerrun.load(tiny_layered("qwen2"), mode="stream")
    layer_bytes = sum(f.bytes - f.data_start for f in eng.manifest.layers)
    gens = eng.generate_batch([[5, 6, 7, 8]] * 4, max_new_tokens=6, ignore_eos=True)
    # 6 steps (prefill + 5 decodes) for all 4 sequences together, not 24
    assert gens[0].stats.bytes_read == 6 * layer_bytes
    assert gens[0].stats.steps == 6


def test_bad_prompt_objects(tiny_layered):
    eng = layerrun.load(tiny_layered("qwen2"))
    with pytest.raises(layerrun.errors.LayerRunError, match="needs a 'prompt' field"):
        eng.generate_batch([{"text": "x"}])
    with pytest.raises(layerrun.errors.LayerRunError, match=r"unknown prompt field\(s\) \['temprature'\]"):
        eng.generate_batch([{"prompt": "x", "temprature": 1}])


def test_cli_prompts_file(tiny_layered, tmp_path):
    path = tiny_layered("qwen2")
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "Hello"}\n{"prompt": "Why is the sky blue?", "max_tokens": 3}\n"plain string"\n')
    out = tmp_path / "out.jsonl"
    p = subprocess.run([sys.executable, "-m", "layerrun", "generate", str(path), "--prompts-file", str(src),
                        "--output", str(out), "--max-new-tokens", "6", "--batch-size", "2", "--raw", "--quiet"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "Why is the sky blue?", "plain string"]
    eng = layerrun.load(path)
    for r in rows:
        n = 3 if r["prompt"].startswith("Why") else 6
        want = eng.generate(r["prompt"], max_new_tokens=n, chat=False)
        assert r["token_ids"] == want.token_ids and r["finish_reason"] == want.finish_reason
    assert "aggregate" in p.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    p = subprocess.run([sys.executable, "-m", "layerrun", "generate", str(path), "--prompts-file", str(bad)],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "bad.jsonl:2: not valid JSON" in p.stderr and "Traceback" not in p.stderr


def test_requests_are_held_to_the_planned_context(tiny_layered):
    """--context is what the KV cache and workspace were budgeted for: prompts and generation stay inside it."""
    from layerrun.errors import LayerRunError

    eng = layerrun.load(tiny_layered("llama_gqa"), context=32)
    assert eng.args.max_position_embeddings > 32
    with pytest.raises(LayerRunError, match="planned for a context of 32 .*--context"):
        eng.generate(list(range(3, 40)), max_new_tokens=4)
    bg = eng.batch_generator(2)
    with pytest.raises(LayerRunError, match="planned for a context of 32"):
        bg.request(list(range(3, 40)))
    g = eng.generate(list(range(3, 23)), max_new_tokens=50, ignore_eos=True)
    assert len(g.token_ids) == 12 and g.finish_reason == "length"  # 20 + 12 = the 32 planned
