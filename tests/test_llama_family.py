"""The Llama family (llama, mistral, qwen2) against transformers on tiny random models."""

from __future__ import annotations

import pytest
import torch
import transformers

import layerrun

FAMILY = ["llama_gqa", "llama_tied_sharded", "mistral", "qwen2"]


def reference(path, dtype=torch.float32):
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return m.eval()


def prompt_ids(n=40, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (batch, n), generator=g)


@pytest.mark.parametrize("name", FAMILY)
def test_logits_match_transformers_fp32(name, tiny_hf, tiny_layered):
    ref = reference(tiny_hf(name))
    eng = layerrun.load(tiny_layered(name))
    ids = prompt_ids(40, batch=2)
    with torch.no_grad():
        want = ref(ids).logits
    got = eng.logits(ids)
    assert got.shape == (2, 40, 320)
    assert (got - want).abs().max().item() < 1e-4
    assert want.abs().max().item() > 0.1  # the test compares something non-trivial


@pytest.mark.parametrize("name", FAMILY)
def test_greedy_tokens_with_kv_cache_match(name, tiny_hf, tiny_layered):
    ref = reference(tiny_hf(name))
    eng = layerrun.load(tiny_layered(name))
    ids = prompt_ids(24)
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 24:].tolist()
    got = eng.generate(ids[0].tolist(), max_new_tokens=20, ignore_eos=True)
    assert got.token_ids == want
    assert got.finish_reason == "length"
    assert len(set(want)) > 1


@pytest.mark.parametrize("mode,prefetch", [("stream", 0), ("stream", 1), ("stream", 3), ("partial", 2), ("full", 2)])
@pytest.mark.parametrize("reader", ["pread", "direct", "mmap"])
def test_modes_depths_and_readers_agree(mode, prefetch, reader, tiny_layered):
    path = tiny_layered("qwen2")
    base = layerrun.load(path, mode="full").generate([5, 9, 11, 40], max_new_tokens=12, ignore_eos=True).token_ids
    eng = layerrun.load(path, mode=mode, reader=reader, prefetch=prefetch)
    assert eng.mode == mode
    if mode == "partial":
        assert 0 < len(eng.plan.resident) < 3
    g = eng.generate([5, 9, 11, 40], max_new_tokens=12, ignore_eos=True)
    assert g.token_ids == base
    # a second request on the same engine reuses the running pipeline
    assert eng.generate([5, 9, 11, 40], max_new_tokens=12, ignore_eos=True).token_ids == base
    eng.close()


def test_batch_of_two_left_padded(tiny_hf, tiny_layered):
    ref = reference(tiny_hf("qwen2"))
    eng = layerrun.load(tiny_layered("qwen2"))
    ids = prompt_ids(30, batch=2, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # second row is 19 tokens, left-padded
    ids[1, :11] = 0
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    got = eng.logits(ids, attention_mask=mask)
    valid = mask.bool()
    assert (got[valid] - want[valid]).abs().max().item() < 1e-4
    # the padded row equals running it alone
    alone = eng.logits(ids[1:, 11:])
    assert (got[1, 11:] - alone[0]).abs().max().item() < 1e-4


def test_mistral_sliding_window_matters(tiny_hf, tiny_layered):
    """With 40 tokens and a window of 16, dropping the window must change the logits."""
    eng = layerrun.load(tiny_layered("mistral"))
    assert eng.args.sliding_window == 16
    ids = prompt_ids(40)
    windowed = eng.logits(ids)
    eng.args.sliding_window = None
    unwindowed = eng.logits(ids)
    assert (windowed[0, 20:] - unwindowed[0, 20:]).abs().max().item() > 1e-3
    assert (windowed[0, :16] - unwindowed[0, :16]).abs().max().item() < 1e-5


def test_bf16_close_to_transformers_bf16(tiny_hf, tiny_layered):
    ref = reference(tiny_hf("qwen2_bf16"), dtype=torch.bfloat16)
    eng = layerrun.load(tiny_layered("qwen2_bf16"))
    ids = prompt_ids(32)
    with torch.no_grad():
        want = ref(ids).logits.float()
    got = eng.logits(ids)
    assert (got - want).abs().max().item() < 2e-2


def test_chat_template_and_text_generation_match_transformers(tiny_hf, tiny_layered):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf("llama_gqa"))
    ref = reference(tiny_hf("llama_gqa"))
    eng = layerrun.load(tiny_layered("llama_gqa"))
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue? ✓  42"}]
    want_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert eng.encode_prompt(msgs) == list(want_ids)
    assert eng.encode_prompt("Why is the sky blue? ✓  42", system="Be brief.") == list(want_ids)
    assert eng.encode_prompt("hello  world 123", chat=False) == tok("hello  world 123")["input_ids"]
    with torch.no_grad():
        out = ref.generate(torch.tensor([want_ids]), max_new_tokens=16, do_sample=False)[0, len(want_ids):].tolist()
    if out and out[-1] == 2:
        out = out[:-1]
    g = eng.generate(msgs, max_new_tokens=16)
    assert g.token_ids == out
    assert g.text == tok.decode(out, skip_special_tokens=True)


def test_stream_yields_pieces_that_join_to_generate_text(tiny_layered):
    eng = layerrun.load(tiny_layered("llama_gqa"), mode="stream")
    chunks = list(eng.stream("Hello", max_new_tokens=10, chat=False, ignore_eos=True))
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.generated_tokens == 10
    assert [c.token_id for c in chunks[:-1]] == eng.generate("Hello", max_new_tokens=10, chat=False, ignore_eos=True).token_ids
    s = chunks[-1].stats
    assert s.prompt_tokens == len(eng.encode_prompt("Hello", chat=False))
    assert s.bytes_read == 10 * sum(f.bytes - f.data_start for f in eng.manifest.layers)


def test_stop_strings_cut_text(tiny_layered):
    eng = layerrun.load(tiny_layered("llama_gqa"))
    full = eng.generate([5, 6, 7], max_new_tokens=30, ignore_eos=True)
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    g = eng.generate([5, 6, 7], max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert g.finish_reason == "stop"
    assert g.text == text[: text.find(stop)]
    streamed = "".join(c.text for c in eng.stream([5, 6, 7], max_new_tokens=30, ignore_eos=True, stop=[stop]))
    assert streamed == g.text


def test_seeded_sampling_is_reproducible(tiny_layered):
    eng = layerrun.load(tiny_layered("llama_gqa"))
    kw = dict(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.9, ignore_eos=True)
    a = eng.generate([5, 6, 7], seed=1, **kw).token_ids
    assert a == eng.generate([5, 6, 7], seed=1, **kw).token_ids
    assert a != eng.generate([5, 6, 7], seed=2, **kw).token_ids


def test_import_and_generation_do_not_import_transformers(tiny_layered):
    import subprocess
    import sys

    code = (
        "import sys, layerrun\n"
        f"e = layerrun.load({str(tiny_layered('llama_gqa'))!r})\n"
        "e.generate('hi', max_new_tokens=3)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
