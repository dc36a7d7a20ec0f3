"""Benchmarks: ``layerrun bench io MODEL`` and ``layerrun bench generate MODEL``.

``bench io`` measures disk -> host read throughput of the prefetch pipeline
(:class:`layerrun.io.pipeline.LayerStream`) over a model's layer files, with no
compute: layers are consumed and released as soon as they arrive. For each
prefetch depth it measures a cold pass (O_DIRECT, or the page cache dropped per
file with ``posix_fadvise(DONTNEED)`` for ``--reader pread``) and a warm pass
(page cache), each next to ``dd`` on the same files, run just before it (the
physical limit: ``dd iflag=direct`` cold, plain ``dd`` from the page cache
warm), so every ratio is measured in one run.

``bench generate`` measures decode tokens/s, stall % and overlap efficiency
(step time / max(sum of reads, sum of computes)) per memory mode, prefetch depth
and throttle, as the median of ``--repeat`` runs.

Both return plain dicts (also printed with ``--json``); see
:func:`bench_io` and :func:`layerrun.bench_generate.bench_generate` (its own module).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from layerrun.bench_refs import (
    DD_BS,
    DD_BS_CACHED,
    _bracket,
    _disk_of,
    dd_read,
    drop_page_cache,
    fio_read,
    machine_info,
    memcpy_gb_s,
    pinned_copy_gb_s,
    warm_page_cache,
)
from layerrun.errors import LayerRunError

DEFAULT_IO_DEPTHS = (0, 1, 2, 4, 8)
DEFAULT_GEN_DEPTHS = (0, 1, 2, 4)
EXIT_OK = 0
RATE_MIN_BYTES = 32 * 10**6  # bench io remembers a disk rate only from reading at least this much a pass
EXIT_INVALID = 2

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---- helpers ------------------------------------------------------------------------


def parse_int_list(text: str, flag: str = "--depths") -> list[int]:
    try:
        vals = [int(x) for x in str(text).split(",") if x.strip() != ""]
    except ValueError:
        raise LayerRunError(f"{flag}: expected comma-separated integers like 0,1,2,4, got {text!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise LayerRunError(f"{flag}: expected non-negative integers like 0,1,2,4, got {text!r}")
    return vals


def parse_throttles(text: str | Sequence | None) -> list[int | None]:
    """``none,200MB/s`` -> [None, 200_000_000]."""
    from layerrun.io.throttle import parse_size

    if text is None:
        return [None]
    items = text.split(",") if isinstance(text, str) else list(text)
    out: list[int | None] = []
    for it in items:
        if it is None or (isinstance(it, str) and it.strip().lower() in ("", "none", "off", "0")):
            out.append(None)
        else:
            out.append(parse_size(it, "--throttle"))
    return out or [None]


def _fmt_rate(r: int | None) -> str:
    return "none" if not r else f"{r / 1e6:g} MB/s"


def _union(intervals, lo: float = float("-inf"), hi: float = float("inf")) -> float:
    """Total length of the union of ``intervals``, clipped to [lo, hi]."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        a, b = max(a, lo), min(b, hi)
        if b <= a or b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _stream_once(folder: Path, entries, depth: int, backend: str, rate: int | None, passes: int, cold: bool,
                 device: str = "cpu") -> dict:
    import torch

    from layerrun.io.pipeline import LayerStream
    from layerrun.io.throttle import Throttle

    per_pass = sum(e.bytes - e.data_start for e in entries)
    throttle = Throttle(rate) if rate else None
    t_begin = time.perf_counter()
    stream = LayerStream(folder, entries, depth=depth, backend=backend, throttle=throttle, device=torch.device(device))
    stream.stats.reads = []  # every read of the run (a pipeline keeps only the latest by default)
    copy_s = 0.0
    marks = [t_begin]
    nbytes = 0
    try:
        for _ in range(passes):
            for e in entries:
                s = stream.next()
                if s.layer != (e.layer if e.layer is not None else -1):
                    raise RuntimeError(f"pipeline delivered layer {s.layer}, expected {e.layer}")
                nbytes += s.record.bytes
                if cold and stream.reader.backend != "direct" and passes > 1:
                    # Evict before the slot is released: the next read of this file starts after it.
                    stream.reader.drop_cache(e)
                stream.release(s)
                copy_s += s.record.copy_s
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())
        reads = [(r.start, r.end) for r in stream.stats.reads]
        stall = stream.stats.stall_s
        used = stream.reader.backend
        note = stream.reader.note
    finally:
        stream.close()
    pass_s = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    steady = pass_s[1:] if len(pass_s) > 1 else pass_s
    steady_s = sum(steady)
    busy = _union(reads)
    out = {
        "reader": used,
        "passes": passes,
        "bytes": nbytes,
        "bytes_per_pass": per_pass,
        "seconds": round(marks[-1] - marks[0], 4),
        "pass_gb_s": [round(per_pass / s / 1e9, 3) if s > 0 else 0.0 for s in pass_s],
        "first_pass_gb_s": round(per_pass / pass_s[0] / 1e9, 3) if pass_s[0] > 0 else 0.0,
        # Steady state: passes after the first (ring slots already faulted in, prefetch primed).
        "gb_s": round(per_pass * len(steady) / steady_s / 1e9, 3) if steady_s > 0 else 0.0,
        "busy_gb_s": round(nbytes / busy / 1e9, 3) if busy > 0 else 0.0,
        "stall_s": round(stall, 4),
    }
    if device == "cuda":
        # The host -> device copies alone (CUDA events around each on the copy stream).
        out["copy_s"] = round(copy_s, 4)
        out["h2d_gb_s"] = round(nbytes / copy_s / 1e9, 3) if copy_s > 0 else 0.0
    if note:
        out["note"] = note
    if cold and used != "direct" and depth >= len(entries) and passes > 1:
        out["note"] = (out.get("note", "") + "; " if out.get("note") else "") + (
            f"depth {depth} >= {len(entries)} layers: prefetch wraps before a file is evicted, so later passes "
            "are partly warm")
    return out


def _combine_rounds(rows: list[dict]) -> dict:
    """One row per depth: medians over rounds of each rate and ratio (each round's figures kept in ``rounds``)."""
    if len(rows) == 1:
        return {**rows[0], "rounds": 1}
    out: dict = {"depth": rows[0]["depth"], "rounds": len(rows)}
    for k in ("cold", "warm", "dd_direct", "fio_direct", "dd_cached"):
        got = [r[k] for r in rows if isinstance(r.get(k), dict) and r[k].get("gb_s") is not None]
        if not got:
            continue
        d = {**got[0], "gb_s": round(statistics.median(g["gb_s"] for g in got), 3),
             "rounds_gb_s": [g["gb_s"] for g in got]}
        if "first_pass_gb_s" in got[0]:
            d["first_pass_gb_s"] = round(statistics.median(g["first_pass_gb_s"] for g in got), 3)
        for drop in ("pass_gb_s", "before_gb_s", "after_gb_s", "bytes", "seconds", "stall_s", "busy_gb_s"):
            d.pop(drop, None)
        if "bytes" in got[0]:
            d["bytes"] = sum(g["bytes"] for g in got)
        out[k] = d
    for k in ("cold_vs_dd", "cold_vs_fio", "warm_vs_dd", "cold_vs_throttle", "warm_vs_throttle", "h2d_gb_s", "h2d_vs_pinned"):
        vals = [r[k] for r in rows if k in r]
        if vals:
            out[k] = round(statistics.median(vals), 3)
            out[k + "_rounds"] = vals
    out["per_round"] = rows
    return out


def bench_io(
    path,
    depths: Sequence[int] = DEFAULT_IO_DEPTHS,
    passes: int = 2,
    reader: str = "direct",
    throttle: int | str | None = None,
    caches: Sequence[str] = ("cold", "warm"),
    refs: Sequence[str] = ("dd", "fio"),
    fio_iodepth: int = 16,
    rounds: int = 1,
    log: Log = _quiet,
    device: str = "cpu",
) -> dict:
    """Disk -> host GB/s of the prefetch pipeline per depth, cold and warm, next to dd/fio on the same files.

    ``device="cuda"``: the pipeline also copies each layer from its pinned slot to the GPU on the copy
    stream; rows then carry ``h2d_gb_s`` (bytes over the copies' own CUDA-event time) and the result
    ``pinned_copy_gb_s``, a plain pinned ``copy_`` of one layer's size, and ``h2d_vs_pinned``.

    Each pipeline measurement is bracketed by the reference tools (run just before and
    just after it; their mean is the reference), so every ratio comes from one run.
    Returns ``{"model", "layers", "layer_bytes", "machine", "disk", "reader", "throttle", "passes",
    "results": [{"depth", "cold": {...}, "warm": {...}, "dd_direct": {...}, "fio_direct": {...},
    "dd_cached": {...}, "cold_vs_dd", "cold_vs_fio", "warm_vs_dd"}, ...], "best_cold": {...}}``.
    ``gb_s`` is the steady state (the passes after the first when ``passes > 1``);
    ``first_pass_gb_s`` includes ring set-up and first-touch page faults of the slots.
    """
    from layerrun.engine.engine import resolve_model_path
    from layerrun.formats.manifest import Manifest
    from layerrun.io.throttle import parse_size

    if reader not in ("pread", "direct"):
        raise LayerRunError(f"--reader {reader!r} is not one of: pread, direct")
    if device not in ("cpu", "cuda"):
        raise LayerRunError(f"--device {device!r} is not one of: cpu, cuda")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LayerRunError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if passes < 1:
        raise LayerRunError(f"--passes must be >= 1, got {passes}")
    if rounds < 1:
        raise LayerRunError(f"--rounds must be >= 1, got {rounds}")
    bad = [c for c in caches if c not in ("cold", "warm")]
    if bad or not caches:
        raise LayerRunError(f"--cache: expected cold and/or warm, got {','.join(caches)!r}")
    bad = [r for r in refs if r not in ("dd", "fio")]
    if bad:
        raise LayerRunError(f"--ref: expected dd and/or fio (or none), got {','.join(refs)!r}")
    depths = list(depths)
    if not depths or any(d < 0 for d in depths):
        raise LayerRunError(f"--depths must be non-negative integers, got {depths}")
    rate = parse_size(throttle, "--throttle") if throttle not in (None, "", "none") else None
    folder = resolve_model_path(path)
    man = Manifest.read(folder)
    entries = man.layers
    if not entries:
        raise LayerRunError(f"{folder}: the model has no layer files")
    files = [folder / e.name for e in entries]
    layer_bytes = sum(e.bytes - e.data_start for e in entries)
    result = {
        "bench": "io",
        "model": str(folder),
        "layers": len(entries),
        "layer_bytes": layer_bytes,
        "file_bytes": sum(e.bytes for e in entries),
        "reader": reader,
        "throttle": rate,
        "passes": passes,
        "rounds": rounds,
        "machine": machine_info(),
        "disk": _disk_of(folder),
        "results": [],
        "notes": [],
        "device": device,
    }
    use_dd = "dd" in refs and shutil.which("dd") is not None
    use_fio = "fio" in refs and shutil.which("fio") is not None
    for tool, used in (("dd", use_dd), ("fio", use_fio)):
        if tool in refs and not used:
            result["notes"].append(f"{tool} is not installed: no {tool} reference")

    def cold_refs() -> dict:
        out = {}
        if use_dd:
            out["dd_direct"] = dd_read(files, direct=True)
        if use_fio:
            out["fio_direct"] = fio_read(files, iodepth=fio_iodepth)
        return out

    log(f"bench io: {folder} — {len(entries)} layers, {layer_bytes / 1e9:.3f} GB per pass, "
        f"reader {reader}, passes {passes}, rounds {rounds}, throttle {_fmt_rate(rate)}")
    result["memcpy_gb_s"] = memcpy_gb_s()
    log(f"  memcpy (memory bandwidth, torch copy of 128 MiB): {result['memcpy_gb_s']:.3f} GB/s")
    if device == "cuda":
        result["pinned_copy_gb_s"] = pinned_copy_gb_s(max(e.bytes - e.data_start for e in entries))
        log(f"  pinned host -> device copy_ of one layer: {result['pinned_copy_gb_s']:.3f} GB/s")

    def measure(depth: int) -> dict:
        row: dict = {"depth": depth}
        if "cold" in caches:
            before = cold_refs()
            drop_page_cache(files)
            row["cold"] = _stream_once(folder, entries, depth, reader, rate, passes, cold=True, device=device)
            after = cold_refs()
            for k in before:
                row[k] = _bracket(before[k], after.get(k))
            msg = f"  depth {depth} cold: {row['cold']['gb_s']:.3f} GB/s ({row['cold']['reader']})"
            for k, name in (("dd_direct", "dd"), ("fio_direct", "fio")):
                ref = row.get(k) or {}
                if ref.get("gb_s"):
                    row[f"cold_vs_{name}"] = round(row["cold"]["gb_s"] / ref["gb_s"], 3)
                    msg += f", {name} {ref['gb_s']:.3f} GB/s (ratio {row[f'cold_vs_{name}']:.2f})"
            log(msg)
        if "warm" in caches:
            warm_page_cache(files)
            before = dd_read(files, direct=False) if use_dd else None
            row["warm"] = _stream_once(folder, entries, depth, "pread", rate, passes, cold=False, device=device)
            if use_dd:
                row["dd_cached"] = _bracket(before, dd_read(files, direct=False))
            ref = row.get("dd_cached") or {}
            if ref.get("gb_s"):
                row["warm_vs_dd"] = round(row["warm"]["gb_s"] / ref["gb_s"], 3)
            log(f"  depth {depth} warm: {row['warm']['gb_s']:.3f} GB/s"
                + (f", dd (page cache) {ref['gb_s']:.3f} GB/s (ratio {row['warm_vs_dd']:.2f})" if ref.get("gb_s") else ""))
        if rate:
            for c in ("cold", "warm"):
                if c in row:
                    row[f"{c}_vs_throttle"] = round(row[c]["gb_s"] * 1e9 / rate, 3)
        if device == "cuda":
            h2d = [row[c]["h2d_gb_s"] for c in ("cold", "warm") if c in row and row[c].get("h2d_gb_s")]
            if h2d and result.get("pinned_copy_gb_s"):
                row["h2d_gb_s"] = max(h2d)
                row["h2d_vs_pinned"] = round(max(h2d) / result["pinned_copy_gb_s"], 3)
                log(f"  depth {depth} host -> device from the pinned ring: {row['h2d_gb_s']:.3f} GB/s "
                    f"({row['h2d_vs_pinned']:.2f} of a plain pinned copy_)")
        return row

    per_depth: dict[int, list[dict]] = {d: [] for d in depths}
    for rnd in range(rounds):
        if rounds > 1:
            log(f" round {rnd + 1} of {rounds}")
        for depth in depths:
            per_depth[depth].append(measure(depth))
    result["results"] = [_combine_rounds(per_depth[d]) for d in dict.fromkeys(depths)]
    notes = {r[c]["note"] for r in result["results"] for c in ("cold", "warm") if c in r and r[c].get("note")}
    result["notes"].extend(sorted(notes))
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    best = max((r for r in result["results"] if "cold" in r), key=lambda r: r["cold"]["gb_s"], default=None)
    if best is not None:
        result["best_cold"] = {"depth": best["depth"], "gb_s": best["cold"]["gb_s"],
                               "vs_dd": best.get("cold_vs_dd"), "vs_fio": best.get("cold_vs_fio")}
    return result


def _wide_console():
    from rich.console import Console

    c = Console()
    return c if c.is_terminal else Console(width=160)


def print_io_table(res: dict, console=None) -> None:
    from rich.table import Table

    c = console or _wide_console()
    thr = res.get("throttle")
    rows = res["results"]
    has_fio = any("fio_direct" in r for r in rows)
    t = Table(
        title=(f"layerrun bench io — {res['model']}: {res['layers']} layers, {res['layer_bytes'] / 1e9:.3f} GB/pass, "
               f"reader {res['reader']}, {res['passes']} pass(es), throttle {_fmt_rate(thr)}"
               + (f", median of {res['rounds']} rounds" if res.get("rounds", 1) > 1 else "")),
        title_justify="left",
        caption=("GB/s = bytes / wall time of the passes after the first (1st: the first pass, with ring set-up and "
                 "first-touch page faults). dd/fio read the same files just before and just after each measurement "
                 f"(mean shown): dd bs={DD_BS} iflag=direct cold, bs={DD_BS_CACHED} warm"
                 + (", fio libaio direct" if has_fio else "") + "."),
        caption_justify="left",
    )
    cols = ["depth", "cold GB/s", "cold 1st", "dd direct", "cold/dd"]
    if has_fio:
        cols += ["fio direct", "cold/fio"]
    cols += ["warm GB/s", "warm 1st", "dd cached", "warm/dd"]
    if thr:
        cols += ["cold/throttle", "warm/throttle"]
    cuda = res.get("device") == "cuda"
    if cuda:
        cols += ["H2D GB/s", "H2D/pinned copy_"]
    for col in cols:
        t.add_column(col, justify="right")

    def g(r, *keys):
        d = r
        for k in keys:
            if not isinstance(d, dict) or d.get(k) is None:
                return "-"
            d = d[k]
        return f"{d:.3f}" if isinstance(d, float) else str(d)

    def pct(r, k):
        return f"{r[k]:.0%}" if k in r else "-"

    for r in rows:
        cells = [str(r["depth"]), g(r, "cold", "gb_s"), g(r, "cold", "first_pass_gb_s"), g(r, "dd_direct", "gb_s"),
                 pct(r, "cold_vs_dd")]
        if has_fio:
            cells += [g(r, "fio_direct", "gb_s"), pct(r, "cold_vs_fio")]
        cells += [g(r, "warm", "gb_s"), g(r, "warm", "first_pass_gb_s"), g(r, "dd_cached", "gb_s"), pct(r, "warm_vs_dd")]
        if thr:
            cells += [pct(r, "cold_vs_throttle"), pct(r, "warm_vs_throttle")]
        if cuda:
            cells += [g(r, "h2d_gb_s"), pct(r, "h2d_vs_pinned")]
        t.add_row(*cells)
    c.print(t)
    m = res["machine"]
    c.print(f"machine: {m.get('cpu')}, {m['cpus']} cpus, {m['memory_gib']} GiB, load {m.get('load_avg')} at start, "
            f"{res.get('load_avg_end')} at end; "
            f"disk {res.get('disk')}; memcpy {res.get('memcpy_gb_s')} GB/s"
            + (f"; pinned copy_ to {m.get('gpu', 'the GPU')} {res.get('pinned_copy_gb_s')} GB/s" if cuda else "")
            + f"; {m['date']}", highlight=False)
    for n in res.get("notes", []):
        c.print(f"note: {n}", highlight=False)


# ---- CLI --------------------------------------------------------------------------
def _stderr_log(quiet: bool) -> Log:
    if quiet:
        return _quiet
    return lambda s: print(s, file=sys.stderr, flush=True)


def _check_plot(a) -> None:
    if a.plot:
        from layerrun.bench_plot import check

        check(a.plot)


def cmd_bench_io(a) -> int:
    _check_plot(a)
    res = bench_io(
        a.model, depths=parse_int_list(a.depths), passes=a.passes, reader=a.reader, throttle=a.throttle,
        caches=[c.strip() for c in a.cache.split(",") if c.strip()],
        refs=[r.strip() for r in a.ref.split(",") if r.strip() and r.strip() != "none"], fio_iodepth=a.fio_iodepth,
        rounds=a.rounds,
        log=_stderr_log(a.quiet or a.json), device=a.device,
    )
    _remember_disk_rate(res)
    if a.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        print_io_table(res)
    if a.plot:
        from layerrun.bench_plot import plot_io

        print(f"plot written to {plot_io(res, a.plot)}", file=sys.stderr)
    return EXIT_OK


def _remember_disk_rate(res: dict) -> None:
    """Save the best cold O_DIRECT rate for `layerrun pull`'s estimates when the model is on the store's disk."""
    from layerrun.formats import store

    best = res.get("best_cold") or {}
    if res.get("reader") != "direct" or res.get("throttle") or res.get("device") != "cpu" or not best.get("gb_s"):
        return
    if res.get("layer_bytes", 0) < RATE_MIN_BYTES:  # small files: per-file latency, not the disk's rate
        return
    try:
        if Path(res["model"]).stat().st_dev != store.home().stat().st_dev:
            return
    except OSError:
        return
    store.save_disk_rate(best["gb_s"], res["model"], f"layerrun bench io (best depth {best['depth']}, cold, O_DIRECT)")


def cmd_bench_generate(a) -> int:
    from layerrun.bench_generate import bench_generate, print_generate_table  # it imports this module's helpers

    _check_plot(a)
    res = bench_generate(
        a.model, modes=[m.strip() for m in a.modes.split(",") if m.strip()], depths=parse_int_list(a.depths),
        throttles=a.throttle, max_new_tokens=a.max_new_tokens, prompt_tokens=a.prompt_tokens, repeat=a.repeat,
        warmup=a.warmup, reader=a.reader, dtype=a.compute_dtype, max_memory=a.max_memory, device=a.device,
        seed=a.seed, log=_stderr_log(a.quiet or a.json),
    )
    if a.json:
        print(json.dumps(res, indent=1, default=str))
    else:
        print_generate_table(res)
    if a.plot:
        from layerrun.bench_plot import plot_generate

        print(f"plot written to {plot_generate(res, a.plot)}", file=sys.stderr)
    return EXIT_OK


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` (with ``io`` and ``generate``) on the ``layerrun`` subparsers; returns the bench parser."""
    b = subparsers.add_parser("bench", help="benchmarks: disk read throughput (io) and generation speed (generate)",
                              description="Benchmarks. Every figure comes with the machine it was measured on.")
    bsub = b.add_subparsers(dest="bench_command", metavar="BENCH")

    def bench_help(_a) -> int:
        b.print_help()
        return EXIT_INVALID

    b.set_defaults(fn=bench_help)

    c = bsub.add_parser(
        "io", help="disk -> host GB/s of the prefetch pipeline per depth, cold and warm, next to dd",
        description="Reads every layer file through the prefetch pipeline with no compute, per prefetch depth, "
                    "cold (O_DIRECT, or the page cache dropped) and warm (page cache), each next to dd on the "
                    "same files (the physical limit).")
    c.add_argument("model", help="layered model folder or local model name")
    c.add_argument("--depths", default=",".join(map(str, DEFAULT_IO_DEPTHS)),
                   help="comma-separated prefetch depths to measure (default: %(default)s)")
    c.add_argument("--passes", type=int, default=2,
                   help="passes over all layers per measurement; with 2 or more the first is reported apart "
                        "(it includes ring set-up and page faults) (default: %(default)s)")
    c.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole sweep this many times and report medians (noisy disks) (default: %(default)s)")
    c.add_argument("--reader", default="direct", choices=["direct", "pread"],
                   help="cold reads: direct (O_DIRECT) or pread with the page cache dropped per file "
                        "(posix_fadvise DONTNEED); warm reads always use pread (default: %(default)s)")
    c.add_argument("--throttle", default=None, help="limit read bandwidth to simulate a slow disk, e.g. 200MB/s")
    c.add_argument("--cache", default="cold,warm", help="which to measure: cold, warm or cold,warm (default: %(default)s)")
    c.add_argument("--ref", default="dd,fio",
                   help="reference tools run on the same files before and after each measurement: dd, fio "
                        "(skipped when not installed), or none (default: %(default)s)")
    c.add_argument("--fio-iodepth", type=int, default=16, help="requests fio keeps in flight (default: %(default)s)")
    c.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: also copy each layer from its pinned slot to the GPU and report that copy's GB/s "
                        "next to a plain pinned copy_ (default: %(default)s)")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    c.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw GB/s against depth next to dd/fio (needs matplotlib)")
    c.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    c.set_defaults(fn=cmd_bench_io)

    c = bsub.add_parser(
        "generate", help="decode tokens/s, stall %% and overlap efficiency per mode, depth and throttle",
        description="Generates from a fixed random prompt (ignoring EOS) per memory mode x throttle x prefetch "
                    "depth and reports the median of --repeat runs.")
    c.add_argument("model", help="layered model folder or local model name")
    c.add_argument("--modes", default="stream,full",
                   help="comma-separated memory modes: stream, partial, full, auto (default: %(default)s)")
    c.add_argument("--depths", default=",".join(map(str, DEFAULT_GEN_DEPTHS)),
                   help="comma-separated prefetch depths for streamed modes (default: %(default)s)")
    c.add_argument("--throttle", default="none",
                   help="comma-separated read bandwidth limits for streamed modes, e.g. none,200MB/s "
                        "(default: %(default)s)")
    c.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per run (default: %(default)s)")
    c.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens (default: %(default)s)")
    c.add_argument("--repeat", type=int, default=3, help="runs per configuration; the median is reported "
                                                         "(default: %(default)s)")
    c.add_argument("--warmup", type=int, default=1, help="untimed 2-token runs before the timed ones "
                                                         "(default: %(default)s)")
    c.add_argument("--reader", default="pread", choices=["pread", "direct", "mmap"],
                   help="how streamed layers are read (default: %(default)s; direct = O_DIRECT, cold)")
    c.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the stored dtype)")
    c.add_argument("--max-memory", default=None, help="memory budget passed to the governor (for partial mode)")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    c.add_argument("--seed", type=int, default=0, help="seed of the random prompt (default: %(default)s)")
    c.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    c.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw tok/s, stall and overlap against depth and throttle (needs matplotlib)")
    c.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    c.set_defaults(fn=cmd_bench_generate)
    return b


def main(argv: list[str] | None = None) -> int:
    """``python -m layerrun.bench io|generate MODEL ...`` (the same as ``layerrun bench``)."""
    p = argparse.ArgumentParser(prog="layerrun")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    add_bench_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    a = p.parse_args(["bench", *[x for x in argv if x != "--debug"]])
    try:
        return a.fn(a)
    except LayerRunError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
