"""Mixtral-style MoE in stream mode: routed expert reads against reading whole layers.

    python tools/synthetic_model.py /tmp/synmoe --preset moe --dtype bfloat16
    python bench/moe_reads.py /tmp/synmoe [--tokens 8] [--throttle 200MB/s] [--batch 1,8]

For each batch size, runs stream-mode decoding with ``experts="all"`` (every layer
read whole, prefetched behind compute) and ``experts="routed"`` (attention + router
prefetched; then only the experts the step routes to, read on demand), in one
process, alternating, and prints decode tokens/s, GB read per forward step and the
ratio routed / all.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import layerrun


def run(model: str, experts: str, batch: int, tokens: int, throttle: str | None, reader: str) -> dict:
    eng = layerrun.load(model, mode="stream", experts=experts, throttle=throttle, reader=reader, prefetch=2,
                        batch_size=batch)
    V = eng.args.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (16,), generator=g).tolist() for _ in range(batch)]
    t0 = time.perf_counter()
    outs = eng.generate_batch(prompts, max_new_tokens=tokens, ignore_eos=True, batch_size=batch)
    wall = time.perf_counter() - t0
    s = outs[0].stats  # every row shares the steps' reads
    steps = s.steps
    decode_steps = steps - 1
    eng.close()
    return {
        "experts": experts, "batch": batch, "throttle": throttle or "none",
        "decode_tok_s": round(batch * decode_steps / s.decode_s, 3) if s.decode_s else None,
        "gb_per_step": round(s.bytes_read / steps / 1e9, 4),
        "expert_loads_per_layer_step": round(s.experts_read / max(1, steps * eng.args.num_hidden_layers), 2),
        "skipped_pct": round(100 * s.expert_bytes_skipped / max(1, s.expert_bytes_read + s.expert_bytes_skipped), 1),
        "stall_pct": round(s.stall_pct, 1), "wall_s": round(wall, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--throttle", default="200MB/s", help="read bandwidth limit, or 'none' (warm page cache)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--reader", default="pread")
    a = ap.parse_args()
    throttle = None if a.throttle == "none" else a.throttle
    rows = []
    for b in [int(x) for x in a.batch.split(",")]:
        r_all = run(a.model, "all", b, a.tokens, throttle, a.reader)
        r_routed = run(a.model, "routed", b, a.tokens, throttle, a.reader)
        r_routed["speedup_vs_all"] = round(r_routed["decode_tok_s"] / r_all["decode_tok_s"], 2)
        rows += [r_all, r_routed]
        for r in (r_all, r_routed):
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
