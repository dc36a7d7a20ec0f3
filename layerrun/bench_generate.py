"""``layerrun bench generate MODEL``: decode tokens/s, stall % and overlap efficiency per memory mode,
prefetch depth and throttle (the CLI and the shared helpers are in :mod:`layerrun.bench`)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence

from layerrun.bench import (
    DEFAULT_GEN_DEPTHS,
    Log,
    _disk_of,
    _fmt_rate,
    _quiet,
    _union,
    _wide_console,
    machine_info,
    parse_throttles,
)
from layerrun.errors import LayerRunError


def _prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    lo = min(3, vocab - 1)
    return torch.randint(lo, vocab, (n,), generator=g).tolist()


def _median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    t = os.times()
    return t.user + t.system


def _one_generate(engine, ids: list[int], max_new: int) -> dict:
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    g = engine.generate(ids, max_new_tokens=max_new, ignore_eos=True)
    t1 = time.perf_counter()
    cpu = cpu_seconds() - c0
    s = g.stats
    busy_in_run = _union(s.read_intervals, t0, t1)
    bound = max(busy_in_run, s.compute_s)
    return {
        "generated_tokens": s.generated_tokens,
        "decode_tokens_per_s": s.decode_tokens_per_s,
        "prefill_s": s.prefill_s,
        "decode_s": s.decode_s,
        "steps": s.steps,
        "step_s": s.step_s,
        "compute_s": s.compute_s,
        "read_busy_s": s.read_busy_s,
        "read_busy_in_run_s": busy_in_run,
        "stall_s": s.stall_s,
        "stall_pct": s.stall_pct,
        "overlap_efficiency": s.overlap_efficiency,
        # The same ratio with reads clipped to this call: reads the pipeline did before it (prefetched while
        # idle) are not counted, so it cannot flatter the figure.
        "overlap_efficiency_in_run": s.step_s / bound if bound > 0 else 0.0,
        "bytes_read": s.bytes_read,
        "read_gb_s": s.read_gb_s,
        "wall_s": t1 - t0,
        # CPU seconds this process got per wall second (at most the core count): low values mean
        # the run waited on I/O or other processes took the cores.
        "cpu_util": cpu / (t1 - t0) if t1 > t0 else 0.0,
        "token_ids": g.token_ids,
    }


MEDIAN_KEYS = ("decode_tokens_per_s", "prefill_s", "decode_s", "step_s", "compute_s", "read_busy_s",
               "read_busy_in_run_s", "stall_s", "stall_pct", "overlap_efficiency", "overlap_efficiency_in_run",
               "read_gb_s", "wall_s", "cpu_util")


def bench_generate(
    path,
    modes: Sequence[str] = ("stream", "full"),
    depths: Sequence[int] = DEFAULT_GEN_DEPTHS,
    throttles: Sequence[int | str | None] = (None,),
    max_new_tokens: int = 16,
    prompt_tokens: int = 16,
    repeat: int = 3,
    warmup: int = 1,
    reader: str = "pread",
    dtype: str | None = None,
    max_memory: str | int | None = None,
    device: str = "auto",
    seed: int = 0,
    log: Log = _quiet,
) -> dict:
    """Decode tokens/s, stall % and overlap efficiency per mode x throttle x depth (median of ``repeat`` runs).

    Full mode reads nothing while generating, so it runs once (no throttle, depth n/a).
    Returns ``{"model", "machine", ..., "results": [{"mode", "mode_requested", "depth", "throttle",
    "median": {...}, "runs": [...]}, ...], "best": [...]}``.
    """
    import layerrun
    from layerrun.engine.engine import resolve_model_path

    if repeat < 1:
        raise LayerRunError(f"--repeat must be >= 1, got {repeat}")
    if max_new_tokens < 2:
        raise LayerRunError("--max-new-tokens must be >= 2 (decode speed needs at least one decode step)")
    if prompt_tokens < 1:
        raise LayerRunError(f"--prompt-tokens must be >= 1, got {prompt_tokens}")
    for m in modes:
        if m not in ("stream", "partial", "full", "auto"):
            raise LayerRunError(f"--modes: {m!r} is not one of: stream, partial, full, auto")
    rates = parse_throttles(throttles)
    folder = resolve_model_path(path)
    from layerrun.engine.model_files import load_config

    vocab = load_config(folder)[1].args.vocab_size  # config.json read and checked as the engine reads it
    ids = _prompt_ids(vocab, prompt_tokens, seed)
    context = prompt_tokens + max_new_tokens + 1
    result = {
        "bench": "generate",
        "model": str(folder),
        "machine": machine_info(),
        "disk": _disk_of(folder),
        "reader": reader,
        "dtype": dtype,
        "max_new_tokens": max_new_tokens,
        "prompt_tokens": prompt_tokens,
        "repeat": repeat,
        "warmup": warmup,
        "results": [],
        "notes": [],
    }
    log(f"bench generate: {folder} — modes {','.join(modes)}, depths {','.join(map(str, depths))}, "
        f"throttle {', '.join(_fmt_rate(r) for r in rates)}, {prompt_tokens} prompt + {max_new_tokens} new tokens, "
        f"median of {repeat}")
    configs = []
    for mode in modes:
        if mode == "full":
            configs.append((mode, 0, None))
            continue
        for rate in rates:
            for d in depths:
                configs.append((mode, d, rate))
    if "full" in modes and any(rates):
        result["notes"].append("full mode reads nothing while generating: it runs once, unthrottled")
    for mode, depth, rate in configs:
        t0 = time.perf_counter()
        eng = layerrun.load(folder, mode=mode, prefetch=depth, throttle=rate, context=context, reader=reader,
                            dtype=dtype, max_memory=max_memory, device=device)
        load_s = time.perf_counter() - t0
        try:
            for _ in range(warmup):
                eng.generate(ids, max_new_tokens=2, ignore_eos=True)
            runs = [_one_generate(eng, ids, max_new_tokens) for _ in range(repeat)]
            row = {
                "mode_requested": mode,
                "mode": eng.mode,
                "depth": eng.plan.prefetch if eng.plan.streamed else None,
                "depth_requested": depth if mode != "full" else None,
                "throttle": rate,
                "resident_layers": len(eng.plan.resident),
                "streamed_layers": len(eng.plan.streamed),
                "dtype": str(eng.dtype).replace("torch.", ""),
                "device": str(eng.device),
                "load_s": round(load_s, 3),
                "median": {k: round(_median_of(runs, k), 4) for k in MEDIAN_KEYS},
                "runs": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "token_ids"}
                         for r in runs],
                "token_ids": runs[0]["token_ids"],
                "generated_tokens": runs[0]["generated_tokens"],
                "bytes_read_per_run": runs[0]["bytes_read"],
            }
            if eng.notes:
                row["notes"] = list(eng.notes)
        finally:
            eng.close()
        med = row["median"]
        log(f"  {row['mode']:<7} throttle {_fmt_rate(rate):<10} depth {str(row['depth']):<4} "
            f"{med['decode_tokens_per_s']:.3f} tok/s, stall {med['stall_pct']:.1f}%, "
            f"overlap {med['overlap_efficiency']:.3f} (in-run {med['overlap_efficiency_in_run']:.3f})")
        result["results"].append(row)
    # Best depth per (mode, throttle): the highest decode tokens/s.
    groups: dict = {}
    for r in result["results"]:
        groups.setdefault((r["mode"], r["throttle"]), []).append(r)
    for (mode, rate), rows in groups.items():
        b = max(rows, key=lambda r: r["median"]["decode_tokens_per_s"])
        result["best"] = result.get("best", []) + [{
            "mode": mode, "throttle": rate, "depth": b["depth"],
            "decode_tokens_per_s": b["median"]["decode_tokens_per_s"],
            "overlap_efficiency": b["median"]["overlap_efficiency"],
            "overlap_efficiency_in_run": b["median"]["overlap_efficiency_in_run"],
            "stall_pct": b["median"]["stall_pct"],
        }]
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    ref = [r["token_ids"] for r in result["results"]]
    result["same_tokens_everywhere"] = all(t == ref[0] for t in ref) if ref else True
    return result


def print_generate_table(res: dict, console=None) -> None:
    from rich.table import Table

    c = console or _wide_console()
    t = Table(
        title=(f"layerrun bench generate — {res['model']}: {res['prompt_tokens']} prompt + {res['max_new_tokens']} "
               f"new tokens, reader {res['reader']}, median of {res['repeat']}"),
        title_justify="left",
        caption=("overlap = step time / max(sum of reads, sum of computes), 1.0 is ideal; 'in-run' counts only "
                 "reads done during the measured call. * = best depth (highest tok/s) for its mode and throttle. "
                 "cpu util = this process's CPU seconds per wall second (2.0 = both cores of 2)."),
        caption_justify="left",
    )
    for col in ("mode", "throttle", "depth", "decode tok/s", "stall %", "overlap", "overlap in-run", "reads s",
                "compute s", "steps s", "read GB/s", "cpu util"):
        t.add_column(col, justify="right")
    best = {(b["mode"], b["throttle"], b["depth"]) for b in res.get("best", [])}
    for r in res["results"]:
        m = r["median"]
        mark = "*" if (r["mode"], r["throttle"], r["depth"]) in best and r["streamed_layers"] else ""
        t.add_row(
            r["mode"] + (f" ({r['resident_layers']} res.)" if r["mode"] == "partial" else ""),
            _fmt_rate(r["throttle"]), ("-" if r["depth"] is None else str(r["depth"])) + mark,
            f"{m['decode_tokens_per_s']:.3f}", f"{m['stall_pct']:.1f}",
            f"{m['overlap_efficiency']:.3f}" if r["streamed_layers"] else "-",
            f"{m['overlap_efficiency_in_run']:.3f}" if r["streamed_layers"] else "-",
            f"{m['read_busy_s']:.3f}", f"{m['compute_s']:.3f}", f"{m['step_s']:.3f}",
            f"{m['read_gb_s']:.3f}" if r["streamed_layers"] else "-",
            f"{m['cpu_util']:.2f}",
        )
    c.print(t)
    m = res["machine"]
    c.print(f"machine: {m.get('cpu')}, {m['cpus']} cpus ({m['torch_threads']} torch threads), {m['memory_gib']} GiB, "
            f"load {m.get('load_avg')} at start, {res.get('load_avg_end')} at end; disk {res.get('disk')}; {m['date']}",
            highlight=False)
    if res.get("reader") == "mmap":
        c.print("note: with --reader mmap pages are faulted in by compute, so 'reads s', 'read GB/s' and the overlap "
                "columns count only the madvise call; compare decode tok/s", highlight=False)
    if not res.get("same_tokens_everywhere", True):
        c.print("[yellow]warning: greedy tokens differ between configurations[/yellow]")
    for n in res.get("notes", []):
        c.print(f"note: {n}", highlight=False)
