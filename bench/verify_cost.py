"""What the default integrity check costs: first run (hash + NaN/Inf check) vs later runs (stamp) vs --no-verify.

    python bench/verify_cost.py [MODEL] [--build] [--modes stream,full] [--tokens 8] [--rounds 3]

MODEL defaults to /tmp/synth3gb, the 3.4 GB fp32 synthetic Llama of tools/synthetic_model.py (``--build``
makes it). Every run is a fresh process (verification state is per process), page cache warm (the
model is read once first), the three variants alternated within each round:

- ``first``: no stamp (it is deleted before the run): every file is hashed when first read;
- ``stamped``: the stamp from the run before vouches for every file: nothing is hashed;
- ``off``: ``verify=False``.

Each run reports load seconds (resident files are hashed here), the first forward pass (prefill;
streamed layers are hashed in the staging threads during it), decode tokens/s, the process's CPU
seconds (user + system: what the check costs, whatever else the machine runs) and the bytes hashed.
The summary gives medians, the spread, and each variant's wall and CPU time as a ratio of ``off``.

The runs use ``OMP_WAIT_POLICY=PASSIVE`` by default: with libgomp's default (active) policy, idle
OpenMP workers spin, and on a machine with more runnable threads than cores that spinning decided
the figures: a run whose staging threads had run a torch op (the NaN/Inf check does) made libgomp
count more threads than cores and throttle its spinning, and came out *faster* than a run without
the check. Passive waiting removes that effect from the comparison (``--omp-wait active`` shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import layerrun
path, mode, verify, tokens = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
t1 = time.perf_counter()
eng = layerrun.load(path, mode=mode, verify=verify, reader="pread", context=256)
t2 = time.perf_counter()
g = eng.generate(list(range(100, 132)), max_new_tokens=tokens, ignore_eos=True)
t3 = time.perf_counter()
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": ru.ru_utime + ru.ru_stime, "load_s": t2 - t1, "prefill_s": g.stats.prefill_s, "decode_tok_s": g.stats.decode_tokens_per_s,
                  "generate_s": t3 - t2, "total_s": t3 - t1,
                  "hashed_bytes": eng.verifier.hashed_bytes if eng.verifier else 0,
                  "verify_s": eng.verifier.seconds if eng.verifier else 0.0,
                  "verify_cpu_s": eng.verifier.cpu_seconds if eng.verifier else 0.0}))
"""


def _drop_stamps(model: Path) -> None:
    from layerrun.formats.integrity import STAMP_NAME, _fallback_path

    for p in (model / STAMP_NAME, _fallback_path(model)):
        if p is not None and p.exists():
            p.unlink()


def _run(model: Path, mode: str, verify: bool, tokens: int, omp_wait: str = "passive") -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_WAIT_POLICY": omp_wait.upper()}
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), mode, "1" if verify else "0", str(tokens)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _warm(model: Path) -> None:
    for p in sorted(model.glob("*.safetensors")):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="/tmp/synth3gb", type=Path, help="layered model folder")
    ap.add_argument("--build", action="store_true", help="build the 3.4 GB synthetic model at MODEL first")
    ap.add_argument("--modes", default="stream,full", help="memory modes to measure")
    ap.add_argument("--tokens", type=int, default=8, help="tokens generated per run")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (medians reported)")
    ap.add_argument("--omp-wait", default="passive", choices=["passive", "active"],
                    help="OMP_WAIT_POLICY of the runs (see the module docstring)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.build:
        sys.path.insert(0, str(ROOT / "tools"))
        import synthetic_model

        t = time.perf_counter()
        synthetic_model.build(a.model, "3gb")
        print(f"built {a.model} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    size = sum(p.stat().st_size for p in a.model.glob("*.safetensors"))
    print(f"model {a.model}: {size / 1e9:.2f} GB; load: {os.getloadavg()}")
    _warm(a.model)
    results: dict = {}
    for r in range(a.rounds):
        for mode in a.modes.split(","):
            for variant in ("first", "stamped", "off"):
                if variant == "first":
                    _drop_stamps(a.model)
                res = _run(a.model, mode, variant != "off", a.tokens, a.omp_wait)
                results.setdefault((mode, variant), []).append(res)
                print(f"round {r} {mode:6} {variant:7} load {res['load_s']:6.2f} s  prefill {res['prefill_s']:6.2f} s  "
                      f"decode {res['decode_tok_s']:5.2f} tok/s  total {res['total_s']:6.2f} s  cpu {res['cpu_s']:6.2f} s  "
                      f"hashed {res['hashed_bytes'] / 1e9:.2f} GB in {res['verify_s']:.2f} s "
                      f"({res['verify_cpu_s']:.2f} s CPU)", flush=True)
    print(f"\nmedians over {a.rounds} rounds (min..max); load after: {os.getloadavg()}")
    for mode in a.modes.split(","):
        off = statistics.median(x["total_s"] for x in results[(mode, "off")])
        off_cpu = statistics.median(x["cpu_s"] for x in results[(mode, "off")])
        for variant in ("first", "stamped", "off"):
            xs = results[(mode, variant)]
            tot = [x["total_s"] for x in xs]
            cpu = statistics.median(x["cpu_s"] for x in xs)
            print(f"{mode:6} {variant:7} load {statistics.median(x['load_s'] for x in xs):6.2f} s  "
                  f"prefill {statistics.median(x['prefill_s'] for x in xs):6.2f} s  "
                  f"decode {statistics.median(x['decode_tok_s'] for x in xs):5.2f} tok/s  "
                  f"total {statistics.median(tot):6.2f} s ({min(tot):.2f}..{max(tot):.2f})  "
                  f"= {statistics.median(tot) / off:.2f}x off; cpu {cpu:6.2f} s = {cpu / off_cpu:.2f}x off")


if __name__ == "__main__":
    main()
