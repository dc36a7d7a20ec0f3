"""Command-line pieces shared by every command that runs an engine (generate, serve, bench, chat).

They live here, not in ``cli.py``, so that the server and other commands can use them without
importing the CLI itself (imports run one way: ``cli`` -> everything else).
"""

from __future__ import annotations

import sys


def human_bytes(n: float) -> str:
    from layerrun.formats.destination import human

    return human(n, 2)


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


DEFAULT_PREFETCH = 2  # as Engine's: layers read ahead of compute, when --prefetch is not given
DEFAULT_BATCH_SIZE = 8  # sequences at once for a server or a prompts file (a single prompt is one)


def engine_options(a, sequences: int | None = None) -> dict:
    """Engine keyword arguments from the shared flags. ``sequences``: how many sequences the command runs
    at once when ``--batch-size`` is not given (default :data:`DEFAULT_BATCH_SIZE`): the governor plans the
    KV cache for that many."""
    return dict(
        mode=a.mode, max_memory=a.max_memory, prefetch=DEFAULT_PREFETCH if a.prefetch is None else a.prefetch,
        throttle=a.throttle, device=a.device,
        reader=a.reader, dtype=a.compute_dtype, context=a.context,
        batch_size=a.batch_size or sequences or DEFAULT_BATCH_SIZE,
        experts=getattr(a, "experts", "routed"), kv_cache=getattr(a, "kv_cache", "auto"),
        draft=getattr(a, "draft", None), draft_nodes=getattr(a, "draft_nodes", None),
        draft_fixed=getattr(a, "draft_fixed", False),
        verify=not getattr(a, "no_verify", False),
        threads=getattr(a, "threads", None),
        stage=getattr(a, "stage", None),
    )


def add_engine_flags(c) -> None:
    c.add_argument("--mode", default="auto", choices=["auto", "stream", "partial", "full"],
                   help="auto: the governor picks from free memory; stream: one layer at a time from disk; "
                        "partial: some layers resident; full: every layer resident")
    c.add_argument("--max-memory", default=None, help="memory budget for the whole process, e.g. 1.5GiB or 800MB")
    c.add_argument("--prefetch", type=int, default=None,
                   help=f"layers read ahead of compute (0 = no overlap; default {DEFAULT_PREFETCH}; under torchrun a "
                        f"streaming stage reads its whole range ahead when that fits its memory)")
    c.add_argument("--throttle", default=None, help="limit read bandwidth to simulate a slow disk, e.g. 200MB/s")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="compute device")
    c.add_argument("--reader", default="auto", choices=["auto", "pread", "direct", "mmap"],
                   help="how layer files are read: auto (mmap when the streamed layers fit in the page cache, "
                        "else O_DIRECT), pread, direct (O_DIRECT), mmap")
    c.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the stored dtype; float16 is computed as float32 on CPU)")
    c.add_argument("--context", type=int, default=None,
                   help="context length the KV cache is planned for (default: the model's, at most 4096)")
    c.add_argument("--batch-size", type=int, default=None,
                   help=f"most sequences generated at once (batch mode, server; default {DEFAULT_BATCH_SIZE}); "
                        "the KV cache is planned for this many (a single prompt: one)")
    c.add_argument("--kv-cache", default="auto", choices=["auto", "device", "host"],
                   help="where the KV cache lives: auto (the governor decides), device (with the computing layers), "
                        "host (host memory, each layer's part copied to the GPU for its compute: frees VRAM)")
    c.add_argument("--no-verify", action="store_true",
                   help="skip the integrity check (each file's sha256 and NaN/Inf, done the first time a file is "
                        "read and remembered until it changes)")
    c.add_argument("--threads", default="auto",
                   help="compute threads (torch's, for the whole process): a number, or auto = one per physical "
                        "core less one, at least 1 (on a busy 2-core machine 2 threads ran 2-10x slower than 1)")
    c.add_argument("--experts", default="routed", choices=["routed", "all"],
                   help="mixture-of-experts models (Mixtral): routed reads only the experts each step routes to "
                        "in streamed layers; all reads whole layers ahead, like a dense model")
    c.add_argument("--draft", default=None, metavar="MODEL|ngram",
                   help="speculative decoding: a draft proposes token trees that each pass of the model verifies "
                        "(same output, more tokens per pass): a layered model folder or local model name with the "
                        "same tokenizer (a smaller sibling, or an int8/int4 copy: layerrun convert --quantize int4), "
                        "kept resident; or ngram (lookup in the prompt and the text so far, no model)")
    c.add_argument("--draft-nodes", type=int, default=None, metavar="N",
                   help="most drafted tokens in one tree (default 64); the engine sizes each tree up to it from "
                        "measured costs")
    c.add_argument("--draft-fixed", action="store_true",
                   help="always grow trees to --draft-nodes instead of sizing them from measured costs")


def add_stage_flags(c) -> None:
    """Flags for running as one rank of several under torchrun (``layerrun.engine.distributed``)."""
    c.add_argument("--stages", default=None, metavar="RANGES",
                   help="under torchrun: the layers of each rank, in rank order, e.g. 0-9,10-29 (default: split "
                        "in proportion to each rank's free memory or read rate)")
    c.add_argument("--stage-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="under torchrun: a rank silent this long (a step, or idle pings) counts as gone and the "
                        "others stop")


def print_stage_stats(stages, file=sys.stderr) -> None:
    """--stats under torchrun: one row per stage."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="layerrun --stats per stage", title_justify="left")
    for col in ("stage", "layers", "steps", "read", "read busy", "stall", "compute", "send", "recv wait"):
        t.add_column(col, justify="right")
    for s in stages:
        t.add_row(str(s.rank), f"{s.first}-{s.last}", str(s.steps), f"{s.bytes_read / 1e9:.3f} GB", f"{s.read_s:.3f} s",
                  f"{s.stall_s:.3f} s", f"{s.compute_s:.3f} s", f"{s.send_s:.3f} s", f"{s.wait_s:.3f} s")
    Console(file=file).print(t)


def add_sampling_flags(c) -> None:
    """Sampling flags shared by ``generate`` and ``chat``."""
    c.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    c.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    c.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    c.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than MIN_P x the most likely one (0 = off)")
    c.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logits of tokens already in the prompt or output by this (1 = off; try 1.1)")
    c.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this x the times a token was generated (-2..2, 0 = off)")
    c.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from tokens generated already (-2..2, 0 = off)")
    c.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")


def sampling_options(a) -> dict:
    """The keyword arguments of ``Engine.stream`` that the sampling flags set."""
    return dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, min_p=a.min_p,
                repetition_penalty=a.repetition_penalty, frequency_penalty=a.frequency_penalty,
                presence_penalty=a.presence_penalty)


def looks_like_model(arg: str) -> bool:
    """Whether ``arg`` names a model: an existing folder or file, or a model in the local store."""
    from pathlib import Path

    if Path(arg).expanduser().exists():
        return True
    try:
        from layerrun.formats.store import resolve_name
    except ImportError:
        return False
    return resolve_name(arg) is not None


def print_stats(stats, file=sys.stderr) -> None:
    """The --stats table: pipeline figures and per-layer medians."""
    import statistics

    from rich.console import Console
    from rich.table import Table

    t = Table(title="layerrun --stats", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    rows = [
        ("mode", f"{stats.mode} ({stats.resident_layers} resident, {stats.streamed_layers} streamed, prefetch {stats.prefetch})"),
        ("reader", f"{stats.reader}{' (O_DIRECT)' if stats.direct_io else ''}"),
        ("device / dtype", f"{stats.device} / {stats.dtype}" + (f", {stats.threads} thread{'s' if stats.threads != 1 else ''}" if stats.threads else "")),
        ("KV cache", {"host": "host memory, each layer's part copied to the device for its compute"}.get(
            stats.kv_location, f"on {stats.kv_location}")),
        ("tokens", f"prompt {stats.prompt_tokens}, generated {stats.generated_tokens}"),
        ("prefill", f"{stats.prefill_s:.3f} s"),
        ("decode", f"{stats.decode_tokens_per_s:.2f} tok/s"),
        ("forward steps", f"{stats.steps}, {stats.step_s:.3f} s"),
        ("read", f"{stats.bytes_read / 1e9:.3f} GB, disk busy {stats.read_busy_s:.3f} s ({stats.read_gb_s:.2f} GB/s)"),
        ("compute", f"{stats.compute_s:.3f} s"),
        ("stall (compute waited for I/O)", f"{stats.stall_s:.3f} s = {stats.stall_pct:.1f}% of step time"),
        ("overlap efficiency", f"{stats.overlap_efficiency:.3f} (step time / max(reads, computes); 1.0 is ideal)"),
        ("peak RSS", human_bytes(stats.peak_rss_bytes)),
    ]
    if stats.experts_total:
        seen = stats.expert_bytes_read + stats.expert_bytes_skipped
        rows.append(("experts (routed reads)",
                     f"{stats.experts_read} of {stats.experts_total} expert loads read, "
                     f"{stats.expert_bytes_read / 1e9:.3f} GB; skipped {stats.expert_bytes_skipped / 1e9:.3f} GB "
                     f"({100 * stats.expert_bytes_skipped / max(seen, 1):.0f}% of expert bytes never read)"))
    if stats.peak_vram_bytes:
        rows.append(("peak VRAM", human_bytes(stats.peak_vram_bytes)))
    if stats.copy_s:
        rows.append(("host -> device copies", f"{stats.copy_s:.3f} s on the copy stream "
                                              f"({stats.bytes_read / stats.copy_s / 1e9:.2f} GB/s)"))
    if stats.layer_compute_s and stats.steps:
        per = [v / stats.steps for v in stats.layer_compute_s.values()]
        rows.append(("compute per layer (median)", f"{statistics.median(per) * 1e3:.3f} ms"))
    if stats.draft:
        rows += [
            ("speculation", f"draft {stats.draft}: {stats.tokens_per_pass:.2f} tokens per pass ({stats.passes} passes)"),
            ("drafted / accepted", f"{stats.draft_tokens} / {stats.accepted_tokens} tokens "
                                   f"({100 * stats.acceptance:.0f}% accepted)"),
            ("draft / verify time", f"{stats.draft_s:.3f} s / {stats.verify_s:.3f} s"),
        ]
    for k, v in rows:
        t.add_row(k, v)
    for line in stats.plan:
        t.add_row("governor", line)
    for n in stats.notes:
        t.add_row("note", n)
    Console(file=file).print(t)
