"""Models bigger than the memory they run in: real memory cgroups, from 0.3x to 1.5x the model's size.

Needs root and a cgroup memory controller (v1, as on the project's machines, or v2); skipped
elsewhere. Builds a ~3.1 GB synthetic Llama (fp32) with tools/synthetic_model.py.

Honest limits: a cgroup v1 charges a cached page to whoever read it first, so a model still in the
page cache (from its conversion, or from the full-mode reference run here) would be read for free,
outside the limit. Every run first evicts the model's files (posix_fadvise DONTNEED) and checks
with mincore that nothing of them is cached, and the child reports the bytes it read from storage
(/proc/self/io), which must cover the model's files: the run really read from disk.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import memlimit  # noqa: E402

PROMPT = [1, 17, 93, 204, 5, 388, 42]
N_TOKENS = 2
LIMITS = (0.3, 0.5, 0.75, 1.0, 1.5)  # x the model's size

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(memlimit.cgroup_kind() is None, reason="needs root and a cgroup memory controller"),
]

CHILD = """
import json, sys
sys.path.insert(0, sys.argv[5])
import layerrun, memlimit
from layerrun.engine.telemetry import peak_rss_bytes
from layerrun.errors import LayerRunError
try:
    e = layerrun.load(sys.argv[1], mode=sys.argv[2], prefetch=1, context=64)
except LayerRunError as ex:
    print(f"error: {ex}", file=sys.stderr)
    sys.exit(1)
g = e.generate(json.loads(sys.argv[3]), max_new_tokens=int(sys.argv[4]), ignore_eos=True)
print(json.dumps({"tokens": g.token_ids, "mode": e.mode, "resident": len(e.plan.resident), "plan": e.plan.lines,
                  "peak_rss": peak_rss_bytes(), "read_bytes": int(memlimit.read_bytes_line())}))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    import synthetic_model

    out = tmp_path_factory.mktemp("synthetic") / "llama3gb"
    return synthetic_model.build(out, "3gb")


@pytest.fixture(scope="module")
def size(big_model) -> int:
    from layerrun.formats.manifest import Manifest

    n = Manifest.read(big_model).total_bytes
    assert n > 2.5e9
    return n


@pytest.fixture(scope="module")
def want(big_model) -> list[int]:
    import layerrun

    with layerrun.load(big_model, mode="full", context=64) as full:
        return full.generate(PROMPT, max_new_tokens=N_TOKENS, ignore_eos=True).token_ids


def run(model: Path, mode: str, limit: int) -> tuple[memlimit.Limited, dict]:
    """``mode`` in a fresh cgroup of ``limit`` bytes, the model's files evicted first."""
    assert memlimit.evict(model) == 0, "the model's files are still in the page cache (mapped by some process?)"
    tools = str(Path(memlimit.__file__).parent)
    r = memlimit.run_limited([sys.executable, "-c", CHILD, model, mode, json.dumps(PROMPT), N_TOKENS, tools], limit)
    assert not r.oom_killed, f"OOM-killed at {limit / 2**20:.0f} MiB ({mode}):\n{r.stderr[-3000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
    return r, out


def test_auto_runs_from_0_3_to_1_5_times_the_model_size_with_full_mode_tokens(big_model, size, want):
    from layerrun.formats.manifest import Manifest

    man = Manifest.read(big_model)
    modes = {}
    for f in LIMITS:
        limit = int(f * size)
        r, out = run(big_model, "auto", limit)
        assert r.returncode == 0, f"auto refused or failed at {f}x:\n{r.stderr[-3000:]}"
        assert out["tokens"] == want, (f, out["plan"])
        assert out["peak_rss"] < limit
        assert out["read_bytes"] >= 0.95 * man.total_bytes, f"at {f}x the run read {out['read_bytes']} bytes from disk"
        modes[f] = (out["mode"], out["resident"])
    assert modes[0.3] == ("stream", 0), modes
    assert modes[0.5][0] == "partial" and modes[0.5][1] >= 1, modes  # memory that is there is used
    assert modes[1.5][0] == "full", modes
    resident = [modes[f][1] if modes[f][0] != "full" else man.num_layers for f in LIMITS]
    assert resident == sorted(resident), modes  # more memory, never fewer resident layers


def test_smallest_limit_that_runs_is_within_1_25x_of_what_stream_mode_needs(big_model, size, want):
    """The governor refuses only when streaming really would not fit: at 1.25x the peak resident memory
    a stream run actually reached, auto runs; well below it, auto refuses with one clear line (never
    the OOM killer)."""
    r, stream = run(big_model, "stream", size // 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert stream["tokens"] == want and stream["mode"] == "stream"
    peak = stream["peak_rss"]

    r, out = run(big_model, "auto", int(1.25 * peak))
    assert r.returncode == 0, f"refused at 1.25x the stream peak ({peak / 2**20:.0f} MiB):\n{r.stderr[-3000:]}"
    assert out["tokens"] == want

    r, _ = run(big_model, "auto", int(0.7 * peak))
    assert r.refused, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "cannot run within the cgroup memory limit" in line and "the process itself uses" in line
    assert "a cgroup memory limit of at least" in line and not re.search(r"(?<![-\w])-\d", line)  # no negative figure
