"""The warm-cache cost of reading layers safely while files may change (io/guard.py).

    python bench/file_guard.py MODEL [--baseline CHECKOUT] [--rounds 3] [--tokens 32]
    python bench/file_guard.py MODEL --micro

``--micro``: the guard's own cost, measured in one process (robust to a busy machine): per streamed
layer, the identity check and the acquire/release of its mapping (what ``_stage`` and ``next`` add),
against one layer's decode compute; and the lease watcher's CPU time while it watches every layer.

Stream mode, page cache warm, decode tokens/s of: this checkout's mmap reader (lease-guarded views,
identity checks per layer), this checkout's pread reader (private copies: what a server would pay
to be immune without leases), and, with ``--baseline``, another checkout's mmap reader (e.g. one
from before the guard: unguarded views). Runs alternate within each round, each in a fresh process;
prints the medians and the ratios to this checkout's mmap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys, torch, layerrun
e = layerrun.load(sys.argv[1], mode="stream", reader=sys.argv[2], prefetch=2, context=512)
torch.manual_seed(0)
prompt = torch.randint(10, e.args.vocab_size, (16,)).tolist()
e.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm-up: pages cached, threads started
g = e.generate(prompt, max_new_tokens=int(sys.argv[3]), ignore_eos=True)
print(json.dumps({"tok_s": g.stats.decode_tokens_per_s, "reader": e.reader_backend, "tokens": g.token_ids}))
"""


def run(checkout: Path, model: str, reader: str, tokens: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    p = subprocess.run([sys.executable, "-c", CHILD, model, reader, str(tokens)], cwd=checkout, env=env,
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def micro(model: str, seconds: float = 10.0) -> dict:
    import threading
    import time

    import torch

    import layerrun
    from layerrun.io import guard

    e = layerrun.load(model, mode="stream", reader="mmap", prefetch=2, context=512)
    files = e.files
    entries = [e.manifest.layer(i) for i in e.plan.streamed]
    for ent in entries:
        assert files.mapped(ent) is not None, "no lease: the guard is not in use"
    n = 2000
    t0 = time.perf_counter()
    for k in range(n):
        m = files.mapped(entries[k % len(entries)])
        m.acquire()
        m.release()
        m.acquire()
        m.release()
    per_layer = (time.perf_counter() - t0) / n
    prompt = torch.randint(10, e.args.vocab_size, (16,)).tolist()
    e.generate(prompt, max_new_tokens=4, ignore_eos=True)
    g = e.generate(prompt, max_new_tokens=16, ignore_eos=True)
    layer_compute = g.stats.compute_s / max(g.stats.steps, 1) / e.args.num_hidden_layers
    watcher = guard._WATCHER._thread

    def cpu(tid: int) -> float:
        fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    c0, w0 = cpu(watcher.native_id), time.perf_counter()
    time.sleep(seconds)
    watcher_share = (cpu(watcher.native_id) - c0) / (time.perf_counter() - w0)
    out = {"leased_files": len(entries), "guard_per_layer_us": round(per_layer * 1e6, 2),
           "layer_compute_us": round(layer_compute * 1e6, 1), "guard_over_compute": round(per_layer / layer_compute, 5),
           "watcher_cpu_share_of_a_core": round(watcher_share, 5), "threads": threading.active_count()}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout, run with its mmap reader")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--micro", action="store_true", help="the guard's own cost per layer, in one process")
    a = ap.parse_args()
    if a.micro:
        micro(a.model)
        return
    arms = {"guarded mmap": (ROOT, "mmap"), "pread": (ROOT, "pread")}
    if a.baseline:
        arms["baseline mmap"] = (a.baseline.resolve(), "mmap")
    rates: dict[str, list[float]] = {k: [] for k in arms}
    tokens = {}
    for i in range(a.rounds):
        order = list(arms) if i % 2 == 0 else list(reversed(arms))
        for name in order:
            out = run(*arms[name][:1], a.model, arms[name][1], a.tokens)
            assert out["reader"] == arms[name][1], out
            rates[name].append(round(out["tok_s"], 2))
            tokens.setdefault(name, out["tokens"])
            print(json.dumps({"round": i, "arm": name, "tok_s": rates[name][-1]}), flush=True)
    ref = statistics.median(rates["guarded mmap"])
    summary = {name: {"tok_s": r, "median": statistics.median(r), "x_guarded_mmap": round(statistics.median(r) / ref, 3)}
               for name, r in rates.items()}
    summary["same_tokens"] = len({json.dumps(t) for t in tokens.values()}) == 1
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
