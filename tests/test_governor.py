"""The memory governor's decisions and the KV cache placed in host memory.

The VRAM arithmetic runs on any machine: ``plan_memory(device="cuda", device_memory=(free, total))``
plans for a GPU of that size without asking CUDA. The host-resident KV cache path (each layer's
keys and values copied to the compute device for its compute) is exercised on CPU with
``kv_cache="host"``, where both sides are host memory: the bookkeeping (appends, growth, batch
rows joining and leaving, the cache's recompute for Phi-3) is what runs and is checked.
"""

from __future__ import annotations

import re

import pytest
import torch

import layerrun
from layerrun.engine.governor import kv_bytes, plan_memory
from layerrun.engine.kv_cache import HostLayerKV, LayerKV
from layerrun.errors import LayerRunError

MiB = 2**20


def _ids(n: int, seed: int, vocab: int = 320) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def _plan(eng, free: int, **kw):
    return plan_memory(eng.manifest, eng.args, device="cuda", device_memory=(free, 80 * 2**30), baseline=0,
                       elem_bytes=4, **kw)


@pytest.fixture(scope="module")
def eng(tiny_layered):
    return layerrun.load(tiny_layered("llama_gqa"), mode="full")


def test_kv_stays_on_a_device_with_room(eng):
    p = _plan(eng, 8 * 2**30, context=256)
    assert p.mode == "full" and p.kv_location == "cuda"


def test_kv_moves_to_host_when_that_keeps_more_layers_resident(eng):
    """VRAM for the layers but not also the cache: in host memory the cache travels per layer (its
    bytes) and every layer stays resident, instead of streaming layers (more bytes per token)."""
    big = 64 * 2**30
    need_dev = _plan(eng, big, context=256, kv="device").need
    need_host = _plan(eng, big, context=256, kv="host").need
    kv = kv_bytes(eng.args, 1, 256, 4)
    layers = sum(f.bytes - f.data_start for f in eng.manifest.layers)
    L = eng.args.num_hidden_layers
    # on the device: the cache, plus one layer's old buffer while it grows; in host memory: one layer's share
    # on the device, plus a share of that while it grows
    assert need_dev - need_host == (kv + kv // L) - (kv // L + kv // L // L) and layers > kv
    free = (need_dev + need_host) // 2
    p = _plan(eng, free, context=256)
    assert (p.mode, p.kv_location) == ("full", "host")
    assert any("KV cache in host memory" in line for line in p.lines)
    d = _plan(eng, free, context=256, kv="device")
    assert d.kv_location == "cuda" and d.mode != "full"
    # a long context's cache is bigger than the layers it would make room for: it stays on the device
    ctx = 8192
    free = _plan(eng, big, context=ctx, kv="device").need - 1
    p = _plan(eng, free, context=ctx)
    assert p.kv_location == "cuda" and p.mode != "full"
    assert any("moving it to host memory would gain only" in line for line in p.lines)


def test_kv_on_host_when_nothing_fits_on_the_device_with_it(eng):
    ctx = 65536
    big = 64 * 2**30
    free = _plan(eng, big, context=ctx, kv="host").need + 1  # the cache's other layers' shares do not fit
    with pytest.raises(LayerRunError, match="cannot run"):
        _plan(eng, free, context=ctx, kv="device")
    p = _plan(eng, free, context=ctx)
    assert p.kv_location == "host" and p.mode == "full"
    assert any("does not fit; it lives in host memory" in line for line in p.lines)


def test_kv_flag_is_checked(eng):
    with pytest.raises(LayerRunError, match="--kv-cache 'gpu' is not one of"):
        plan_memory(eng.manifest, eng.args, kv="gpu")


def test_host_layer_kv_appends_and_grows_like_the_device_one():
    g = torch.Generator().manual_seed(0)
    a, b = LayerKV(), HostLayerKV("cpu")
    for T in (5, 1, 1, 300, 1):  # crosses the 256-slot initial capacity
        k, v = torch.randn(2, 2, T, 8, generator=g), torch.randn(2, 2, T, 8, generator=g)
        b.prefetch()
        ka, va = a.update(k, v)
        kb, vb = b.update(k, v)
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert a.length == b.length == 308


@pytest.mark.parametrize("name", ["llama_gqa", "mistral", "gemma2", "mixtral"])
def test_host_kv_gives_the_same_tokens(name, tiny_layered):
    dev = layerrun.load(tiny_layered(name), mode="stream")
    host = layerrun.load(tiny_layered(name), mode="stream", kv_cache="host")
    assert host.plan.kv_location == "host" and dev.plan.kv_location == "cpu"
    assert isinstance(host.new_cache()[0], HostLayerKV)
    prompt = _ids(12, seed=1, vocab=dev.args.vocab_size)
    g = host.generate(prompt, max_new_tokens=20, ignore_eos=True)
    assert g.token_ids == dev.generate(prompt, max_new_tokens=20, ignore_eos=True).token_ids
    assert g.stats.kv_location == "host"
    # continuous batching: rows join, finish early and leave, the cache is compacted
    prompts = [_ids(n, seed=n, vocab=dev.args.vocab_size) for n in (3, 17, 8, 30, 5)]
    lens = [4, 25, 9, 12, 18]
    want = [dev.generate(p, max_new_tokens=m, ignore_eos=True).token_ids for p, m in zip(prompts, lens)]
    got = host.generate_batch([{"prompt": p, "max_new_tokens": m, "ignore_eos": True} for p, m in zip(prompts, lens)],
                              batch_size=3)
    assert [o.token_ids for o in got] == want


def test_host_kv_with_phi3_cache_recompute(tiny_layered):
    dev = layerrun.load(tiny_layered("phi3"), mode="full")
    host = layerrun.load(tiny_layered("phi3"), mode="full", kv_cache="host")
    prompt = _ids(20, seed=3)
    assert host.generate(prompt, max_new_tokens=10, ignore_eos=True).token_ids == \
        dev.generate(prompt, max_new_tokens=10, ignore_eos=True).token_ids


def test_throttle_makes_auto_read_explicitly(tiny_layered):
    """A throttle simulates a slow disk; mmap pages are faulted in by compute and bypass it."""
    eng = layerrun.load(tiny_layered("llama_gqa"), mode="stream", throttle="200MB/s")
    assert eng.reader_backend == "pread"
    g = eng.generate(_ids(4, seed=1), max_new_tokens=2, ignore_eos=True)
    layer_bytes = sum(f.bytes - f.data_start for f in eng.manifest.layers)
    # Each read lasts at least its bytes / rate (read_s sums them); read_busy_s would not do: it counts
    # only the reads' time inside the call, and the pipeline reads the first layers ahead at load.
    assert g.stats.read_s >= 0.9 * g.stats.bytes_read / 200e6 and g.stats.bytes_read == 2 * layer_bytes
    m = layerrun.load(tiny_layered("llama_gqa"), mode="stream", throttle="200MB/s", reader="mmap")
    assert any("--throttle does not apply" in n for n in m.notes)


# ---- the arithmetic: a measured baseline, the KV cache reserved for what runs, figures a person can check ----
@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """~80 MB of fp32 layers (6 x 12.6 MB): big enough that memory figures are not noise."""
    import synthetic_model

    synthetic_model.PRESETS.setdefault("governor", dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                                        num_attention_heads=8, num_key_value_heads=2, vocab_size=4096))
    return synthetic_model.build(tmp_path_factory.mktemp("governor") / "m", "governor")


def _layer_bytes(eng) -> int:
    return max(f.bytes - f.data_start for f in eng.manifest.layers)


def test_budget_below_what_the_process_uses_says_so_in_plain_figures(medium):
    from layerrun.engine.governor import process_rss

    with pytest.raises(LayerRunError) as e:
        layerrun.load(medium, max_memory="40MiB")
    msg = str(e.value)
    assert msg.startswith("the model cannot run within --max-memory 40.0 MiB: the process itself uses ")
    assert "nothing left" in msg and "Would fit: --max-memory of at least " in msg
    assert not re.search(r"(?<![-\w])-\d", msg), msg  # never a negative figure
    # the figure it asks for is enough: loading with it succeeds
    # (in MiB to 0.1, or in GiB to 0.01 when the process holds more, as in a long test session)
    figure, unit = re.search(r"--max-memory of at least ([\d.]+) (MiB|GiB)", msg).groups()
    at_least = float(figure) * (MiB if unit == "MiB" else 1024 * MiB)
    eng = layerrun.load(medium, max_memory=int(at_least + (MiB if unit == "MiB" else 10 * MiB)))
    assert eng.mode == "stream" and process_rss() > 0


def test_a_single_prompt_plans_one_sequence_and_a_batch_its_size(medium, tiny_layered):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "layerrun", "generate", str(tiny_layered("qwen2")), "Hi", "--explain",
                        "--max-new-tokens", "2"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert re.search(r"KV cache .* \(1 sequence x \d+ tokens to begin with; it grows on demand\)", p.stderr), p.stderr
    eng = layerrun.load(medium, batch_size=8)
    assert eng.plan.reserve == (8, 512)


def test_kv_cache_grows_on_demand_by_streaming_resident_layers(medium):
    """Planned for 512 tokens, a 900-token prompt needs more KV cache and workspace than the resident
    layers leave: the engine streams some of them from then on, and the tokens stay full mode's."""
    from layerrun.engine.governor import DEFAULT_RESERVE, process_rss

    full = layerrun.load(medium, mode="full")
    stream_need = plan_memory(full.manifest, full.args, mode="stream", baseline=0, budget=64 * 2**30,
                              context=DEFAULT_RESERVE, elem_bytes=4).need
    layer = _layer_bytes(full)
    eng = layerrun.load(medium, mode="auto", max_memory=process_rss() + stream_need + 2 * layer + layer // 2)
    k0 = len(eng.plan.resident)
    assert eng.mode == "partial" and 1 <= k0 < 6, eng.plan.lines
    short = _ids(10, seed=5, vocab=4096)
    assert eng.generate(short, max_new_tokens=6, ignore_eos=True).token_ids == \
        full.generate(short, max_new_tokens=6, ignore_eos=True).token_ids
    assert len(eng.plan.resident) == k0  # it fit the reservation: nothing changed
    long = _ids(900, seed=6, vocab=4096)
    g = eng.generate(long, max_new_tokens=6, ignore_eos=True)
    assert g.token_ids == full.generate(long, max_new_tokens=6, ignore_eos=True).token_ids
    assert len(eng.plan.resident) < k0, eng.plan.lines
    assert any("the KV cache grew to 1 x 905 tokens" in n for n in eng.notes), eng.notes


def test_a_sequence_that_cannot_fit_even_streamed_is_refused_with_what_would(medium):
    from layerrun.engine.governor import DEFAULT_RESERVE, process_rss

    probe = layerrun.load(medium, mode="stream")
    need = plan_memory(probe.manifest, probe.args, mode="stream", baseline=0, budget=64 * 2**30,
                       context=DEFAULT_RESERVE, elem_bytes=4).need
    eng = layerrun.load(medium, mode="auto", max_memory=process_rss() + need + 8 * MiB)
    prompt = _ids(1200, seed=7, vocab=4096)
    with pytest.raises(LayerRunError, match=r"this request needs .* \(1200 prompt tokens \+ up to 800 new\); the "
                                            r"memory budget leaves .* with every layer streamed\. Would fit: "):
        eng.generate(prompt, max_new_tokens=800)
    assert eng.generate(_ids(8, seed=1, vocab=4096), max_new_tokens=4).token_ids  # the engine goes on
    # the server says the same before queueing it: 400, naming max_tokens
    pytest.importorskip("fastapi")
    import httpx

    from layerrun.server import running_server

    with running_server(eng) as s:
        r = httpx.post(s.base_url + "/completions", json={"prompt": prompt, "max_tokens": 800}, timeout=300)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "insufficient_memory" and err["param"] == "max_tokens"
        assert "1200 prompt tokens + up to 800 new" in err["message"] and "Would fit: " in err["message"]
        ok = httpx.post(s.base_url + "/completions", json={"prompt": prompt[:8], "max_tokens": 4}, timeout=300)
        assert ok.status_code == 200, ok.text


def test_sequences_wait_for_memory_and_all_complete_with_their_tokens(medium):
    """The engine planned for one sequence (of 256 tokens); a batch of up to 8 sequences of 100-token
    prompts runs in what that leaves: the batch admits only as many as fit (the others wait for a
    place), never more than the budget holds, and each gives the tokens of its prompt alone."""
    from layerrun.engine.governor import process_rss, sequences_need

    alone = layerrun.load(medium, mode="full", context=256)
    prompts = [_ids(100, seed=10 + i, vocab=4096) for i in range(4)]
    want = [alone.generate(p, max_new_tokens=16, ignore_eos=True).token_ids for p in prompts]
    need = plan_memory(alone.manifest, alone.args, mode="stream", baseline=0, budget=64 * 2**30, batch=1,
                       context=256, elem_bytes=4).need
    eng = layerrun.load(medium, mode="stream", context=256, max_memory=process_rss() + need + 2 * MiB)
    room = eng.plan.room
    assert sequences_need(eng.args, 4, 100, 116, 4) > room  # all four at once would not fit
    bg = eng.batch_generator(8)
    reqs = [bg.request(p, max_new_tokens=16, ignore_eos=True) for p in prompts]
    widest = 0
    while bg.busy:
        bg.step()
        widest = max(widest, len(bg.rows))
        cols = bg.key_pos.shape[1] if bg.key_pos is not None else 0
        assert sequences_need(eng.args, len(bg.rows), 1, cols, 4) <= room or len(bg.rows) <= 1
    assert [r.token_ids for r in reqs] == want
    assert 1 < widest < 4
