"""MoE at 200 MB/s: stream mode (attention/router read every step) against partial mode with only
every layer's attention, norms and router resident (budget: room for those, not for a layer's experts).

    python tools/synthetic_model.py /tmp/synq3moe --preset qwen3moe --dtype bfloat16
    python bench/moe_dense_resident.py /tmp/synq3moe
"""
import json
import sys

import psutil
import torch

import layerrun
from layerrun.models.base import expert_index

m = sys.argv[1]
probe = layerrun.load(m, mode="stream")
man = probe.manifest
dense = sum(t.nbytes for f in man.layers for n, t in f.tensors.items() if expert_index(n) is None)
exp_layer = sum(t.nbytes for n, t in man.layer(0).tensors.items() if expert_index(n) is not None)
need = probe.plan.need
probe.close()
g = torch.Generator().manual_seed(0)
prompt = torch.randint(3, 16000, (16,), generator=g).tolist()
for _round in range(2):
    for label in ("stream", "partial-dense"):
        if label == "stream":
            eng = layerrun.load(m, mode="stream", throttle="200MB/s", reader="pread")
        else:
            rss = psutil.Process().memory_info().rss
            eng = layerrun.load(m, mode="partial", throttle="200MB/s", reader="pread", max_memory=rss + need + dense + exp_layer // 2)
        out = eng.generate(prompt, max_new_tokens=8, ignore_eos=True)
        s = out.stats
        print(json.dumps({"run": label, "dense_resident": len(eng.plan.dense_resident), "resident": len(eng.plan.resident),
                          "decode_tok_s": round(s.decode_tokens_per_s, 3), "gb_per_step": round(s.bytes_read / s.steps / 1e9, 4),
                          "peak_rss_mib": round(s.peak_rss_bytes / 2**20)}), flush=True)
        eng.close()
