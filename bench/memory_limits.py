"""The governor under real memory cgroups, every run reading its model cold from disk.

    python bench/memory_limits.py sweep MODEL [--limits 0.3,0.5,0.75,1.0,1.25,1.5] [--tokens 2]
    python bench/memory_limits.py threshold MODEL [--tokens 2]
    python bench/memory_limits.py partial MODEL --limit 1.55GB [--rounds 3] [--tokens 3]

``sweep``: ``--mode auto`` in cgroups of each limit x the model's size: the mode and resident layers
the governor picked, the tokens (equal to full mode's?), peak RSS, bytes read from disk, decode tok/s.
``threshold``: the peak RSS a stream run reaches (P), and the smallest limit at which ``auto`` runs
(bisected to 2%); the target is at most 1.25 P.
``partial``: ``auto`` against ``stream`` in one cgroup, alternating, each run cold: decode tok/s and
the bytes read per token (auto keeps layers resident with the memory that is there).

Needs root and a cgroup memory controller. Before every run the model's files are evicted from the
page cache (posix_fadvise DONTNEED, checked with mincore: a cgroup v1 charges cached pages to whoever
read them first, so a cached model would be read for free, outside the limit), and each run reports
the bytes it read from storage (/proc/self/io). Models: ``python tools/synthetic_model.py /tmp/syn3
--preset 3gb`` (3.1 GB fp32) and ``python tools/synthetic_model.py /tmp/syn3bf16 --preset 3gb-bf16
--dtype bfloat16`` (3.1 GB bf16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import memlimit  # noqa: E402

PROMPT = [1, 17, 93, 204, 5, 388, 42, 7, 311, 64]
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[6])
import layerrun, memlimit
from layerrun.engine.telemetry import peak_rss_bytes
from layerrun.errors import LayerRunError
try:
    e = layerrun.load(sys.argv[1], mode=sys.argv[2], prefetch=int(sys.argv[5]), context=64)
except LayerRunError as ex:
    print(f"error: {ex}", file=sys.stderr)
    sys.exit(1)
g = e.generate(json.loads(sys.argv[3]), max_new_tokens=int(sys.argv[4]), ignore_eos=True)
resident = sum(e.manifest.layer(i).bytes for i in e.plan.resident)
print(json.dumps({"tokens": g.token_ids, "mode": e.mode, "resident": len(e.plan.resident), "resident_bytes": resident,
                  "prefetch": e.plan.prefetch,
                  "decode_tok_s": g.stats.decode_tokens_per_s, "prefill_s": g.stats.prefill_s, "reader": e.reader_backend,
                  "peak_rss": peak_rss_bytes(), "read_bytes": int(memlimit.read_bytes_line()), "plan": e.plan.lines}))
"""


def model_size(model: Path) -> int:
    from layerrun.formats.manifest import Manifest

    return Manifest.read(model).total_bytes


def run(model: Path, mode: str, limit: int, tokens: int, prefetch: int = 1) -> dict:
    left = memlimit.evict(model)
    if left:
        raise SystemExit(f"{left} bytes of {model} are still cached after eviction (mapped by a process?)")
    r = memlimit.run_limited([sys.executable, "-c", CHILD, model, mode, json.dumps(PROMPT), tokens, prefetch,
                              ROOT / "tools"], limit)
    row = {"mode_asked": mode, "limit_MiB": round(limit / 2**20, 1), "rc": r.returncode, "oom": r.oom_killed,
           "cgroup_peak_MiB": round(r.max_usage / 2**20, 1)}
    if r.returncode == 0:
        out = json.loads(r.stdout.strip().splitlines()[-1])
        row.update({k: out[k] for k in ("mode", "resident", "prefetch", "reader", "tokens")},
                   resident_GB=round(out["resident_bytes"] / 1e9, 3), decode_tok_s=round(out["decode_tok_s"], 4),
                   peak_rss_MiB=round(out["peak_rss"] / 2**20, 1), read_GB=round(out["read_bytes"] / 1e9, 3))
    else:
        row["error"] = (r.stderr.strip().splitlines() or [""])[-1][:600]
    print(json.dumps(row), flush=True)
    return row


def reference(model: Path, tokens: int) -> list[int]:
    code = ("import json, sys, layerrun; e = layerrun.load(sys.argv[1], mode='full', context=64); "
            "print(json.dumps(e.generate(json.loads(sys.argv[2]), max_new_tokens=int(sys.argv[3]), "
            "ignore_eos=True).token_ids))")
    out = subprocess.run([sys.executable, "-c", code, model, json.dumps(PROMPT), str(tokens)], capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def sweep(model: Path, limits: list[float], tokens: int) -> list[dict]:
    want = reference(model, tokens)
    size = model_size(model)
    rows = []
    for f in limits:
        row = run(model, "auto", int(f * size), tokens)
        row["x_model"] = f
        row["tokens_equal_full"] = row.get("tokens") == want
        rows.append(row)
    return rows


def threshold(model: Path, tokens: int) -> dict:
    size = model_size(model)
    for f in (0.5, 1.0, 2.0):  # a small model's process (Python, torch) may not fit half its size
        stream = run(model, "stream", int(f * size), tokens)
        if stream["rc"] == 0:
            break
    else:
        raise SystemExit("stream mode did not run within 2x the model's size")
    peak = stream["peak_rss_MiB"] * 2**20
    lo, hi = int(0.6 * peak), int(1.6 * peak)  # refuses at lo (checked), runs at hi (checked)
    assert run(model, "auto", lo, tokens)["rc"] == 1
    assert run(model, "auto", hi, tokens)["rc"] == 0
    at_hi = None
    while hi - lo > 0.02 * peak:
        mid = (lo + hi) // 2
        r = run(model, "auto", mid, tokens)
        if r["oom"]:
            raise SystemExit(f"OOM-killed at {mid / 2**20:.0f} MiB: the governor let a run start that did not fit")
        if r["rc"] == 0:
            hi, at_hi = mid, r
        else:
            lo = mid
    out = {"stream_peak_rss_MiB": round(peak / 2**20, 1), "smallest_limit_that_runs_MiB": round(hi / 2**20, 1),
           "ratio": round(hi / peak, 3)}
    if at_hi is not None:  # that run itself (the governor may have lowered the prefetch depth to fit)
        out.update(peak_rss_at_smallest_MiB=at_hi["peak_rss_MiB"],
                   ratio_to_its_own_peak=round(hi / (at_hi["peak_rss_MiB"] * 2**20), 3),
                   tokens_equal=at_hi["tokens"] == stream["tokens"])
    print(json.dumps(out), flush=True)
    return out


def partial(model: Path, limit: int, rounds: int, tokens: int) -> dict:
    rows = {"auto": [], "stream": []}
    for i in range(rounds):
        for mode in (("auto", "stream") if i % 2 == 0 else ("stream", "auto")):
            rows[mode].append(run(model, mode, limit, tokens, prefetch=2))
    auto, stream = rows["auto"], rows["stream"]
    rates = [a["decode_tok_s"] / s["decode_tok_s"] for a, s in zip(auto, stream)]
    out = {"limit_MiB": round(limit / 2**20, 1), "auto_mode": auto[0]["mode"], "auto_resident_GB": auto[0]["resident_GB"],
           "auto_tok_s": [a["decode_tok_s"] for a in auto], "stream_tok_s": [s["decode_tok_s"] for s in stream],
           "auto_over_stream_median": round(statistics.median(rates), 3), "auto_over_stream": [round(r, 3) for r in rates],
           "resident_fraction": round(auto[0]["resident_GB"] * 1e9 / model_size(model), 3),
           "tokens_equal": all(a["tokens"] == stream[0]["tokens"] for a in auto + stream)}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sweep", "threshold", "partial"])
    ap.add_argument("model", type=Path)
    ap.add_argument("--limits", default="0.3,0.5,0.75,1.0,1.25,1.5", help="sweep: limits as multiples of the model size")
    ap.add_argument("--limit", default="1.55GB", help="partial: the cgroup limit")
    ap.add_argument("--rounds", type=int, default=3, help="partial: A/B rounds")
    ap.add_argument("--tokens", type=int, default=2, help="tokens generated per run")
    ap.add_argument("--json", default=None, help="write the result here")
    a = ap.parse_args()
    if memlimit.cgroup_kind() is None:
        raise SystemExit("needs root and a cgroup memory controller")
    if a.what == "sweep":
        res = sweep(a.model, [float(x) for x in a.limits.split(",")], a.tokens)
    elif a.what == "threshold":
        res = threshold(a.model, a.tokens)
    else:
        res = partial(a.model, memlimit.parse_size(a.limit), a.rounds, a.tokens)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
