"""A model bigger than the memory it runs in: a real memory cgroup, half the model's size.

Needs root and the cgroup v1 memory controller (as on the project's machines);
skipped elsewhere. Builds a ~3 GB synthetic Llama with tools/synthetic_model.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

CG_ROOT = Path("/sys/fs/cgroup/memory")
PROMPT = [1, 17, 93, 204, 5, 388, 42]
N_TOKENS = 4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or not (CG_ROOT / "cgroup.procs").exists(),
        reason="needs root and the cgroup v1 memory controller",
    ),
]

CHILD = """
import json, sys, layerrun
from layerrun.engine.telemetry import peak_rss_bytes
e = layerrun.load(sys.argv[1], mode=sys.argv[2], prefetch=1, context=64)
g = e.generate(json.loads(sys.argv[3]), max_new_tokens=int(sys.argv[4]), ignore_eos=True)
print(json.dumps({"tokens": g.token_ids, "mode": e.mode, "resident": len(e.plan.resident),
                  "peak_rss": peak_rss_bytes(), "plan": e.plan.lines}))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import synthetic_model

    out = tmp_path_factory.mktemp("synthetic") / "llama3gb"
    return synthetic_model.build(out, "3gb")


def run_limited(model: Path, mode: str, limit: int) -> dict:
    cg = CG_ROOT / f"layerrun-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        cmd = (
            f"echo $$ > {cg}/cgroup.procs && exec {sys.executable} -c '{CHILD}' "
            f"{model} {mode} '{json.dumps(PROMPT)}' {N_TOKENS}"
        )
        p = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"rc={p.returncode} (137 = OOM-killed)\n{p.stderr[-3000:]}"
        out = json.loads(p.stdout.strip().splitlines()[-1])
        out["max_usage"] = int((cg / "memory.max_usage_in_bytes").read_text())
        return out
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                import time

                time.sleep(0.1)


def test_stream_runs_in_half_the_model_size_with_full_mode_tokens(big_model):
    import layerrun
    from layerrun.formats.manifest import Manifest

    size = Manifest.read(big_model).total_bytes
    assert size > 2.5e9
    with layerrun.load(big_model, mode="full", context=64) as full:
        want = full.generate(PROMPT, max_new_tokens=N_TOKENS, ignore_eos=True).token_ids
    limit = size // 2

    streamed = run_limited(big_model, "stream", limit)
    assert streamed["tokens"] == want
    assert streamed["mode"] == "stream"
    assert streamed["peak_rss"] < limit

    auto = run_limited(big_model, "auto", limit)  # the governor sees the cgroup limit
    assert auto["mode"] in ("stream", "partial"), auto["plan"]
    assert auto["tokens"] == want
    assert auto["peak_rss"] < limit
