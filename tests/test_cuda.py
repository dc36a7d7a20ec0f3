"""The CUDA path: pinned ring, copies on the copy stream, VRAM governor, host-resident KV cache.

These run only where a CUDA device is present (``torch.cuda.is_available()``) and skip cleanly
elsewhere. On a GPU they check that CUDA and CPU give the same greedy tokens in every mode that
moves data to the device, and that the ring is pinned.
"""

from __future__ import annotations

import pytest
import torch

import layerrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls as on CPU, so greedy tokens can be compared
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("mode", ["stream", "partial", "full"])
@pytest.mark.parametrize("name", ["llama_gqa", "gemma2"])
def test_cuda_and_cpu_give_the_same_greedy_tokens(name, mode, tiny_layered):
    cpu = layerrun.load(tiny_layered(name), mode="full", device="cpu")
    gpu = layerrun.load(tiny_layered(name), mode=mode, device="cuda", prefetch=2)
    prompt = _ids(12, 1, cpu.args.vocab_size)
    want = cpu.generate(prompt, max_new_tokens=16, ignore_eos=True).token_ids
    got = gpu.generate(prompt, max_new_tokens=16, ignore_eos=True)
    assert got.token_ids == want
    assert got.stats.device.startswith("cuda")
    if mode == "stream":
        assert all(s.is_pinned() for s in gpu._stream.slots)
        assert got.stats.copy_s > 0 and got.stats.bytes_read > 0


def test_cuda_host_kv_cache_gives_the_same_tokens(tiny_layered):
    dev = layerrun.load(tiny_layered("mistral"), mode="stream", device="cuda", kv_cache="device")
    host = layerrun.load(tiny_layered("mistral"), mode="stream", device="cuda", kv_cache="host")
    assert (dev.plan.kv_location, host.plan.kv_location) == ("cuda", "host")
    assert host.new_cache()[0].k is None and host.new_cache()[0].cuda
    prompt = _ids(20, 2, dev.args.vocab_size)
    assert host.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids == \
        dev.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids
    prompts = [_ids(n, n, dev.args.vocab_size) for n in (3, 11, 7)]
    a = host.generate_batch(prompts, max_new_tokens=10, ignore_eos=True, batch_size=2)
    b = dev.generate_batch(prompts, max_new_tokens=10, ignore_eos=True, batch_size=2)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]


def test_cuda_routed_experts_match_cpu(tiny_layered):
    cpu = layerrun.load(tiny_layered("mixtral"), mode="full", device="cpu")
    gpu = layerrun.load(tiny_layered("mixtral"), mode="stream", device="cuda")
    prompt = _ids(4, 3, cpu.args.vocab_size)
    got = gpu.generate(prompt, max_new_tokens=12, ignore_eos=True)
    assert got.token_ids == cpu.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids
    assert got.stats.expert_bytes_skipped > 0


def test_cuda_compute_dtype_cast_runs_after_the_copy(tiny_layered):
    """fp32 files computed in bf16: the cast runs on the copy stream after the copy (a race otherwise)."""
    ref = layerrun.load(tiny_layered("llama_gqa"), mode="full", device="cuda", dtype="bfloat16")
    eng = layerrun.load(tiny_layered("llama_gqa"), mode="stream", device="cuda", dtype="bfloat16", prefetch=4)
    ids = torch.tensor([_ids(40, 4, ref.args.vocab_size)])
    for _ in range(3):
        assert torch.equal(eng.logits(ids), ref.logits(ids))


def test_bench_io_reports_h2d_against_a_pinned_copy(tiny_layered):
    from layerrun.bench import bench_io

    res = bench_io(tiny_layered("llama_gqa"), depths=[0, 2], caches=["warm"], refs=[], device="cuda")
    assert res["pinned_copy_gb_s"] > 0
    for row in res["results"]:
        assert row["warm"]["h2d_gb_s"] > 0 and row["h2d_vs_pinned"] > 0


@pytest.mark.parametrize("mode", ["stream", "full"])
def test_cuda_speculative_greedy_tokens_equal_cpu(mode, tiny_hf, tiny_layered, tmp_path):
    """A draft on the GPU (an int8 copy, and ngram) verified in one pass: CPU's greedy tokens, several a pass."""
    from layerrun.formats.convert import convert

    draft = tmp_path / "int8"
    convert(tiny_hf("llama_gqa"), draft, progress=False, quantize="int8")
    cpu = layerrun.load(tiny_layered("llama_gqa"), mode="full", device="cpu")
    prompt = _ids(12, 2, cpu.args.vocab_size)
    want = cpu.generate(prompt, max_new_tokens=16, ignore_eos=True).token_ids
    for d in (str(draft), "ngram"):
        gpu = layerrun.load(tiny_layered("llama_gqa"), mode=mode, device="cuda", draft=d, draft_nodes=6, draft_fixed=True)
        got = gpu.generate(prompt, max_new_tokens=16, ignore_eos=True)
        assert got.token_ids == want, d
        if d != "ngram":
            assert got.stats.tokens_per_pass > 1
        gpu.close()
