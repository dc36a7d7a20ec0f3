"""Decode speed with the layers split over 1, 2, ... ranks (torchrun, gloo on loopback), every rank
streaming its share through its own --throttle (one simulated disk per rank).

Alternates the configurations round by round in one run (the machine is shared) and reports per
configuration the median decode tok/s and each round's ratio to one process.

    python bench/pipeline_stages.py MODEL [--ranks 1,2] [--throttle 100MB/s] [--prefetch default|deep|N]
                                          [--rounds 3] [--max-new-tokens 6] [--batch 1] [--json]

``--prefetch default`` (the default): no ``--prefetch`` flag, the governor's choice (2 in one process;
under torchrun a streaming stage's ring covers its range when it fits). ``deep``: each process's ring
holds its whole share (a rank reads its next token's layers while the other stages compute: the point
of the split); a number: that depth everywhere.
``--batch N``: N sequences at once (``--prompts-file``), reporting aggregate tok/s (prefill included).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, ranks: int, layers: int, a) -> float:
    common = ["--raw", "--ignore-eos", "--mode", "stream", "--throttle", a.throttle,
              "--max-new-tokens", str(a.max_new_tokens), "--reader", "pread"]
    if a.prefetch != "default":
        depth = max(1, -(-layers // ranks) - 1) if a.prefetch == "deep" else int(a.prefetch)
        common += ["--prefetch", str(depth)]
    if a.batch > 1:
        f = Path(tempfile.mkdtemp()) / "prompts.jsonl"
        f.write_text("".join(json.dumps({"prompt": f"the history of {i}"}) + "\n" for i in range(a.batch)))
        args = ["generate", model, "--prompts-file", str(f), "--batch-size", str(a.batch), "--quiet", *common]
    else:
        args = ["generate", model, "the history of", "--json", *common]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if ranks == 1:
        cmd = [sys.executable, "-m", "layerrun", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(_port()), "-m", "layerrun", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    if a.batch > 1:
        return float(re.search(r"= ([0-9.]+) tok/s aggregate", p.stderr).group(1))
    return json.loads(p.stdout)["stats"]["decode_tokens_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--throttle", default="100MB/s")
    ap.add_argument("--prefetch", default="default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    layers = json.loads((Path(a.model) / "layerrun.json").read_text())["num_layers"]
    counts = [int(x) for x in a.ranks.split(",")]
    res: dict[int, list[float]] = {n: [] for n in counts}
    loads = []
    for _ in range(a.rounds):
        for n in counts:
            res[n].append(run(a.model, n, layers, a))
        loads.append(os.getloadavg()[0])
    out = {"model": a.model, "throttle": a.throttle, "prefetch": a.prefetch, "batch": a.batch, "load_1min": loads,
           "tok_s": {n: v for n, v in res.items()},
           "median_tok_s": {n: statistics.median(v) for n, v in res.items()},
           "ratio_to_1": {n: [x / y for x, y in zip(res[n], res[counts[0]])] for n in counts}}
    if a.json:
        print(json.dumps(out))
    else:
        for n in counts:
            r = out["ratio_to_1"][n]
            print(f"{n} rank(s): median {out['median_tok_s'][n]:.3f} tok/s; per-round ratio to {counts[0]}: "
                  f"{', '.join(f'{x:.2f}' for x in r)}")
        print(f"load (1 min) after each round: {', '.join(f'{x:.1f}' for x in loads)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
