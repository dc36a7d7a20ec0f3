"""The engine as a library: concurrent ``astream`` / ``agenerate`` callers share the engine's
continuous batching (one scheduler thread), and each gets the tokens it would get alone."""

from __future__ import annotations

import asyncio

import pytest

import layerrun
from layerrun.errors import LayerRunError


@pytest.fixture(scope="module")
def engine(tiny_layered):
    eng = layerrun.load(tiny_layered("qwen2"), mode="stream", prefetch=1, batch_size=4)
    yield eng
    eng.close()


JOBS = [("Once upon a time", 9, {}), ("The quick brown fox", 14, {}), ("Hello", 5, {"temperature": 0.8, "seed": 3}),
        ("Numbers: 1 2 3", 11, {}), ("Why is the sky blue?", 7, {"chat": True}), ("abc", 12, {"presence_penalty": 1.0})]


def test_concurrent_callers_share_steps_and_match_running_alone(engine):
    want = []
    for p, n, kw in JOBS:
        kw = dict(kw)
        want.append(engine.generate(p, max_new_tokens=n, chat=kw.pop("chat", False), **kw))

    async def one(p, n, kw):
        kw = dict(kw)
        chat = kw.pop("chat", False)
        if p.startswith("Numbers"):  # one caller streams, the others await whole generations
            ids = [c.token_id async for c in engine.astream(p, max_new_tokens=n, chat=chat, **kw) if c.token_id is not None]
            return ids
        return (await engine.agenerate(p, max_new_tokens=n, chat=chat, **kw)).token_ids

    async def main():
        return await asyncio.gather(*(one(p, n, kw) for p, n, kw in JOBS))

    steps0 = engine.scheduler.steps
    got = asyncio.run(main())
    assert got == [w.token_ids for w in want]
    steps = engine.scheduler.steps - steps0
    # alone, each needs one step per token; together (4 at a time) far fewer
    assert steps < sum(len(w.token_ids) for w in want) * 0.6, steps


def test_a_bad_request_fails_alone(engine):
    async def main():
        good = asyncio.ensure_future(engine.agenerate("Hello", max_new_tokens=6, chat=False))
        with pytest.raises(LayerRunError, match="min_p"):
            await engine.agenerate("Hello", max_new_tokens=6, min_p=5)
        return await good

    assert asyncio.run(main()).token_ids == engine.generate("Hello", max_new_tokens=6, chat=False).token_ids


def test_leaving_early_frees_the_place(engine):
    async def main():
        n = 0
        async for _ in engine.astream("Tell", max_new_tokens=500, ignore_eos=True, chat=False):
            n += 1
            if n == 3:
                break
        await asyncio.sleep(0)
        return await engine.agenerate("Hello", max_new_tokens=4, chat=False)

    steps0 = engine.scheduler.steps
    g = asyncio.run(main())
    assert g.token_ids == engine.generate("Hello", max_new_tokens=4, chat=False).token_ids
    assert engine.scheduler.steps - steps0 < 50  # the abandoned 500-token sequence stopped


def test_default_load_batches_concurrent_callers(tiny_layered):
    """load() without batch_size plans the KV cache for one sequence; concurrent async callers still share
    steps (each joins when the governor finds room for its cache) and get the tokens they get alone."""
    eng = layerrun.load(tiny_layered("llama_gqa"), mode="stream", prefetch=1)
    try:
        assert eng.batch_size == 1
        prompts = ["Once upon a time", "The quick brown fox", "Numbers: 1 2 3"]
        want = [eng.generate(p, max_new_tokens=10, chat=False, ignore_eos=True).token_ids for p in prompts]

        async def main():
            return await asyncio.gather(*(eng.agenerate(p, max_new_tokens=10, chat=False, ignore_eos=True)
                                          for p in prompts))

        steps0 = eng.scheduler.steps
        got = [g.token_ids for g in asyncio.run(main())]
        assert got == want
        assert eng.scheduler.steps - steps0 < sum(len(w) for w in want) * 0.6, eng.scheduler.steps - steps0
    finally:
        eng.close()
