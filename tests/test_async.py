"""The async API: compute runs off the caller's event loop."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

import layerrun

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory):
    """~60 MB of layers, so each step computes for long enough that a blocked loop would show."""
    import synthetic_model

    synthetic_model.PRESETS.setdefault("async", dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                                                    num_attention_heads=8, num_key_value_heads=2, vocab_size=4096))
    return synthetic_model.build(tmp_path_factory.mktemp("async") / "m", "async")


async def _ticker(gaps: list[float], stop: asyncio.Event):
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.01)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["stream", "full"])
async def test_event_loop_stays_responsive(medium_model, mode):
    eng = layerrun.load(medium_model, mode=mode, prefetch=2, context=256)  # 99 prompt + 64 new tokens
    gaps: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(gaps, stop))
    t0 = time.perf_counter()
    tokens = []
    async for chunk in eng.astream(list(range(1, 100)), max_new_tokens=64, ignore_eos=True):
        if chunk.token_id is not None:
            tokens.append(chunk.token_id)
    elapsed = time.perf_counter() - t0
    stop.set()
    await ticker
    eng.close()
    assert len(tokens) == 64
    assert elapsed > 0.3, "generation too short to say anything about responsiveness"
    assert max(gaps) < 0.05, f"event loop blocked for {max(gaps) * 1e3:.0f} ms"
    assert len(gaps) > elapsed / 0.05


@pytest.mark.asyncio
async def test_async_matches_sync_and_cancels(medium_model):
    eng = layerrun.load(medium_model, mode="stream", prefetch=1, context=128)
    want = eng.generate([3, 4, 5], max_new_tokens=8, ignore_eos=True).token_ids
    got = await eng.agenerate([3, 4, 5], max_new_tokens=8, ignore_eos=True)
    assert got.token_ids == want
    n = 0
    async for _ in eng.astream([3, 4, 5], max_new_tokens=200, ignore_eos=True):
        n += 1
        if n == 3:
            break  # leaving early must stop the engine thread and free the engine
    again = await eng.agenerate([3, 4, 5], max_new_tokens=8, ignore_eos=True)
    assert again.token_ids == want
    eng.close()
