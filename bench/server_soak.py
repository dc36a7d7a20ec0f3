"""Server soak: many concurrent streams give the tokens of each prompt alone, and memory stays flat.

    python bench/server_soak.py [MODEL] [--clients 64] [--tokens 24] [--sequential 500] [--mode stream]

Starts ``layerrun serve MODEL`` in a subprocess on a free loopback port, then:

1. equality: each of ``--clients`` prompts alone (one request at a time, greedy), then all of them at
   once as streaming requests; every stream's token ids must equal its prompt's alone;
2. soak: ``--sequential`` requests one after another (prompts and lengths varied); the server's
   resident memory (psutil, the whole process) after a warm-up of 10% of them, every 50 requests,
   and at the end; the growth after warm-up (target: under 5%).

Prints one JSON object per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int) -> list[str]:
    topics = ["the sea", "a clock", "winter", "bread", "a violin", "trains", "the moon", "a garden", "rain", "maps"]
    return [f"Write two sentences about {topics[i % len(topics)]} (number {i})." for i in range(n)]


async def stream_one(c: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> list[int]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0,
            "stream": True, "return_token_ids": True}
    ids = []
    async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"])
            for ch in obj["choices"]:
                ids += ch.get("token_ids") or []
    return ids


def alone(url: str, prompt: str, tokens: int) -> list[int]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0,
            "return_token_ids": True}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=64, help="concurrent streams (0: skip the equality phase)")
    ap.add_argument("--tokens", type=int, default=24, help="max_tokens of each concurrent stream")
    ap.add_argument("--sequential", type=int, default=500)
    ap.add_argument("--mode", default="stream")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--compute-dtype", default=None, help="passed to `layerrun serve` (float32: batch-invariant sums)")
    a = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "layerrun", "serve", a.model, "--port", str(port), "--mode", a.mode,
           "--batch-size", str(a.batch_size), "--max-waiting", str(max(64, a.clients)), "--log-level", "warning"]
    if a.compute_dtype:
        cmd += ["--compute-dtype", a.compute_dtype]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "LAYERRUN_API_KEY": ""})
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit(server.stderr.read())
            time.sleep(0.5)
        proc = psutil.Process(server.pid)
        ps = prompts(max(a.clients, 64))
        if a.clients:
            concurrent(url, ps[: a.clients], a.tokens)
        sequential(url, ps, a.sequential, proc)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def concurrent(url: str, ps: list[str], tokens: int) -> None:
    """Each prompt alone, one request at a time; then all at once as streams: the same token ids?"""
    t0 = time.perf_counter()
    want = [alone(url, p, tokens) for p in ps]
    t_alone = time.perf_counter() - t0

    async def together():
        async with httpx.AsyncClient(timeout=3600) as c:
            return await asyncio.gather(*(stream_one(c, url, p, tokens) for p in ps))

    t0 = time.perf_counter()
    got = asyncio.run(together())
    t_together = time.perf_counter() - t0
    n_tok = sum(len(g) for g in got)
    print(json.dumps({"phase": "concurrent", "clients": len(ps), "equal_to_alone": sum(g == w for g, w in zip(got, want)),
                      "tokens": n_tok, "alone_s": round(t_alone, 1), "together_s": round(t_together, 1),
                      "alone_tok_s": round(sum(map(len, want)) / t_alone, 2),
                      "together_tok_s": round(n_tok / t_together, 2)}), flush=True)


def sequential(url: str, ps: list[str], n: int, proc: psutil.Process) -> None:
    warm = max(1, n // 10)
    samples, base = [], None
    t0 = time.perf_counter()
    for i in range(n):
        p = ps[i % len(ps)] + " " + "Again." * (i % 7)
        alone(url, p, 4 + i % 13)
        if i + 1 == warm:
            base = proc.memory_info().rss
        if (i + 1) % 50 == 0:
            samples.append(round(proc.memory_info().rss / 2**20, 1))
    end = proc.memory_info().rss
    print(json.dumps({"phase": "sequential", "requests": n, "seconds": round(time.perf_counter() - t0, 1),
                      "rss_after_warmup_MiB": round(base / 2**20, 1), "rss_end_MiB": round(end / 2**20, 1),
                      "growth_pct": round(100 * (end - base) / base, 2), "rss_every_50_MiB": samples}), flush=True)


if __name__ == "__main__":
    main()
