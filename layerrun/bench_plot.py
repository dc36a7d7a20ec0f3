"""``layerrun bench io|generate --plot FILE.png``: the benchmark's curves as a picture (matplotlib).

matplotlib is an optional extra (``pip install 'layerrun[plot]'``); it is imported
only here, only when a plot is asked for, with the non-interactive Agg backend.

- ``bench io``: GB/s against prefetch depth, cold and warm, next to the disk's
  own limit measured on the same files (``dd iflag=direct``, fio) and the page
  cache's (plain ``dd``), and the throttle when one was set.
- ``bench generate``: decode tokens/s, stall % and overlap efficiency against
  prefetch depth, one line per mode and throttle (full mode, which reads
  nothing, as a horizontal line).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from layerrun.errors import LayerRunError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise LayerRunError("--plot needs matplotlib: pip install matplotlib (or 'layerrun[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check(path) -> None:
    """Fail before a long benchmark, not after it: matplotlib is there and the file name is usable."""
    _check_path(path)
    _pyplot()


def _check_path(path) -> Path:
    p = Path(path)
    if p.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LayerRunError(f"--plot {path}: give a .png, .svg or .pdf file name")
    if not p.parent.exists():
        raise LayerRunError(f"--plot {path}: the folder {p.parent} does not exist")
    return p


def _rate(r: int | None) -> str:
    return "no throttle" if not r else f"throttle {r / 1e6:g} MB/s"


def _footer(fig, res: dict) -> None:
    m = res.get("machine", {})
    fig.text(0.01, 0.01, f"{Path(str(res.get('model', ''))).name} · {m.get('cpu') or '?'}, {m.get('cpus')} cpus · "
                          f"load {m.get('load_avg')} · {m.get('date', '')}", fontsize=7, color="#666")


def plot_io(res: dict, path) -> Path:
    """GB/s against prefetch depth (cold, warm) with dd/fio and the throttle as reference lines."""
    path = _check_path(path)
    plt = _pyplot()
    rows = res["results"]
    depths = [r["depth"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for key, label, color in (("cold", f"pipeline, cold ({res.get('reader')})", "#1f77b4"),
                              ("warm", "pipeline, warm (page cache)", "#2ca02c")):
        ys = [r[key]["gb_s"] if isinstance(r.get(key), dict) else None for r in rows]
        if any(y is not None for y in ys):
            ax.plot(depths, ys, "o-", color=color, label=label)
    refs = (("dd_direct", "dd iflag=direct (the disk's limit)", "#1f77b4", "--"),
            ("fio_direct", "fio libaio direct", "#9467bd", ":"),
            ("dd_cached", "dd from the page cache", "#2ca02c", "--"))
    for key, label, color, style in refs:
        vals = [r[key]["gb_s"] for r in rows if isinstance(r.get(key), dict) and r[key].get("gb_s")]
        if vals:
            ax.axhline(statistics.median(vals), color=color, linestyle=style, linewidth=1, label=f"{label}: "
                       f"{statistics.median(vals):.2f} GB/s")
    if res.get("throttle"):
        ax.axhline(res["throttle"] / 1e9, color="#d62728", linestyle="-.", linewidth=1,
                   label=f"throttle {res['throttle'] / 1e6:g} MB/s")
    ax.set_xlabel("prefetch depth (layers read ahead)")
    ax.set_ylabel("GB/s")
    ax.set_xticks(depths)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"layerrun bench io: {res['layers']} layers, {res['layer_bytes'] / 1e9:.2f} GB a pass")
    ax.legend(fontsize=8, loc="best")
    _footer(fig, res)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_generate(res: dict, path) -> Path:
    """Decode tokens/s, stall % and overlap efficiency against depth, per mode and throttle."""
    path = _check_path(path)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    series: dict = {}
    full = []
    for r in res["results"]:
        if not r["streamed_layers"]:
            full.append(r)
            continue
        series.setdefault((r["mode"], r["throttle"]), []).append(r)
    panels = (("decode_tokens_per_s", "decode tokens/s"), ("stall_pct", "stall (% of step time)"),
              ("overlap_efficiency", "overlap: step / max(reads, computes)"))
    for ax, (key, label) in zip(axes, panels):
        for (mode, rate), rows in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            rows = sorted(rows, key=lambda r: r["depth"])
            ax.plot([r["depth"] for r in rows], [r["median"][key] for r in rows], "o-", label=f"{mode}, {_rate(rate)}")
        if key == "decode_tokens_per_s":
            for r in full:
                ax.axhline(r["median"][key], color="#333", linestyle="--", linewidth=1,
                           label=f"full mode: {r['median'][key]:.2f} tok/s")
        if key == "overlap_efficiency":
            ax.axhline(1.0, color="#999", linestyle=":", linewidth=1, label="1.0 = I/O fully hidden")
        ax.set_xlabel("prefetch depth")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        depths = sorted({r["depth"] for rows in series.values() for r in rows})
        if depths:
            ax.set_xticks(depths)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"layerrun bench generate: {res['prompt_tokens']} prompt + {res['max_new_tokens']} new tokens, "
                 f"median of {res['repeat']}")
    _footer(fig, res)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
