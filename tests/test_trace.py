"""``--trace`` files: structure that Perfetto can draw.

Perfetto (and chrome://tracing) stack complete ("X") slices of one track by
nesting; two slices on one track that overlap without one containing the other
are drawn wrongly or dropped. Prefetched reads overlap in time, so they must not
share a track: each ring slot gets its own.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

import layerrun


def partial_overlaps(events: list[dict]) -> list[tuple[dict, dict]]:
    """Pairs of X slices on one (pid, tid) that overlap without nesting."""
    bad = []
    by_track = defaultdict(list)
    for e in events:
        if e.get("ph") == "X":
            by_track[(e["pid"], e["tid"])].append(e)
    for evs in by_track.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack and e["ts"] + e["dur"] > stack[-1]["ts"] + stack[-1]["dur"]:
                bad.append((stack[-1], e))
            stack.append(e)
    return bad


def overlapping_pairs(slices: list[dict]) -> int:
    s = sorted(slices, key=lambda e: e["ts"])
    return sum(1 for a, b in zip(s, s[1:]) if b["ts"] < a["ts"] + a["dur"])


@pytest.mark.parametrize("name", ["qwen2", "mixtral"])
def test_trace_has_no_partially_overlapping_slices(tiny_layered, tmp_path, name):
    # A throttle makes each read last long enough for the prefetched ones to overlap in time.
    eng = layerrun.load(tiny_layered(name), mode="stream", prefetch=3, throttle="20MB/s", trace=True)
    try:
        eng.generate([3, 4, 5, 6, 7], max_new_tokens=6, ignore_eos=True)
    finally:
        eng.close()
    path = tmp_path / "trace.json"
    eng.trace.write(path)
    events = json.loads(path.read_text())["traceEvents"]
    assert partial_overlaps(events) == []
    reads = [e for e in events if e.get("cat") == "read" and not e["args"]["resident"]]
    computes = [e for e in events if e.get("cat") == "compute"]
    assert len(computes) == 6 * eng.args.num_hidden_layers
    tracks = {e["tid"] for e in reads}
    assert len(tracks) == 4  # prefetch 3 + the one computing: one track per ring slot
    assert overlapping_pairs(reads) > 0  # on one shared track these would have overlapped
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    assert all(names[t].startswith("io slot ") for t in tracks) and "compute" in names.values()
    if name == "mixtral":  # routed expert reads land on their layer's slot, after the staged part
        assert any("experts" in e["name"] for e in reads)


def test_recent_ring_keeps_the_last_events_without_tracing(tiny_layered):
    eng = layerrun.load(tiny_layered("qwen2"), mode="stream", prefetch=1)
    try:
        eng.trace.keep_recent(50)
        eng.generate([3, 4, 5], max_new_tokens=10, ignore_eos=True)
        recent = eng.trace.since(0)
        assert len(recent) == 50 and eng.trace.events == []  # bounded, and no full trace kept
        kinds = {e[1] for e in recent}
        assert {"read", "compute"} <= kinds
        last = recent[-1][0]
        assert eng.trace.since(last) == [] and eng.trace.since(last - 3) == recent[-3:]
    finally:
        eng.close()


def test_loading_shows_progress_on_a_terminal(tiny_layered, monkeypatch, capsys):
    """A bar while resident files load (on a terminal: TTY_COMPATIBLE=1 makes rich treat stderr as one), then
    one line; nothing without progress=True."""
    from layerrun.engine import engine as engine_module

    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setattr(engine_module._LoadProgress, "MIN_BYTES", 0)  # the tiny model loads in no time
    path = tiny_layered("qwen2")
    capsys.readouterr()
    layerrun.load(path, mode="full").close()
    assert capsys.readouterr().err == ""
    eng = layerrun.load(path, mode="full", progress=True)
    eng.close()
    err = capsys.readouterr().err
    total = sum(f.bytes for f in eng.manifest.files)
    assert "loading" in err and f"loaded {total / 1e6:.0f} MB in " in err
