"""The async API: compute runs off the caller's event loop."""

from __future__ import annotations

import asyncio
import sys
import threading
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


async def _ticker(ticks: list[float], stop: asyncio.Event):
    while not stop.is_set():
        await asyncio.sleep(0.01)
        ticks.append(time.perf_counter())


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["stream", "full"])
async def test_event_loop_never_runs_model_code(medium_model, mode):
    """The property, asserted so that load cannot break it: every layer computes on a thread other than
    the loop's (recorded on each call of the real model code), and the loop keeps serving other tasks
    while tokens arrive (a ticker's ticks fall between the first and the last token). No wall-clock
    bound: on a machine at load 16 everything is slower, but neither fact changes."""
    eng = layerrun.load(medium_model, mode=mode, prefetch=2, context=256)
    threads: list[int] = []
    real_layer = eng.model.layer

    def layer(*args, **kwargs):
        threads.append(threading.get_ident())
        return real_layer(*args, **kwargs)

    eng.model.layer = layer  # observes the real computation; changes nothing
    loop_thread = threading.get_ident()
    ticks: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(ticks, stop))
    arrivals = []
    async for chunk in eng.astream(list(range(1, 100)), max_new_tokens=64, ignore_eos=True):
        if chunk.token_id is not None:
            arrivals.append(time.perf_counter())
    stop.set()
    await ticker
    eng.close()
    assert len(arrivals) == 64
    assert len(threads) == 64 * eng.args.num_hidden_layers  # prefill (token 1) + 63 steps, every layer
    assert loop_thread not in threads, "model code ran on the event loop's thread"
    between = [t for t in ticks if arrivals[0] < t < arrivals[-1]]
    assert between, "the event loop served nothing else while tokens were generated"


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
