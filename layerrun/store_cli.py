"""The model-store commands: ``pull``, ``list``, ``show``, ``rm``, ``import``.

Before a download, ``pull`` says whether the model will fit this machine and in
which memory mode, and roughly how fast stream mode would run, from the disk
read rate ``layerrun bench io`` measured once (measured here on a model already
in the store when there is none yet).
"""

from __future__ import annotations

import json
import sys

from layerrun.errors import LayerRunError
from layerrun.options import human_bytes

KV_CONTEXT = 4096  # the context the fit estimate reserves a KV cache for (the engine's default)
HEADROOM = 1.15  # activations, workspace and the allocator's slack on top of the weights


def _err_log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def _console():
    from rich.console import Console

    return Console()


# ---- will it fit ------------------------------------------------------------------------
def available_memory() -> int:
    """Free RAM for a new process, within this cgroup's limit if there is one."""
    import psutil

    from layerrun.engine.governor import cgroup_memory_limit

    room = psutil.virtual_memory().available
    limit = cgroup_memory_limit()
    return min(room, limit) if limit else room


def disk_rate(log=_err_log) -> dict | None:
    """The store disk's cold read rate: saved by `bench io`, else measured once on a stored model."""
    from layerrun.formats import store

    saved = store.disk_rate()
    if saved is not None:
        return saved
    from layerrun.bench import RATE_MIN_BYTES, bench_io
    from layerrun.formats.manifest import Manifest

    sized = sorted(((sum(f.bytes for f in Manifest.read(m.folder).layers), m) for m in store.stored() if m.complete),
                   key=lambda x: -x[0])
    models = [m for size, m in sized if size >= RATE_MIN_BYTES]  # small files measure latency, not the disk
    if not models:
        return None

    folder = models[0].folder
    log(f"measuring this disk's read rate once (O_DIRECT reads of {models[0].tag}) ...")
    try:
        res = bench_io(folder, depths=[2], passes=1, caches=("cold",), refs=())
    except (LayerRunError, OSError) as e:
        log(f"could not measure the disk ({e})")
        return None
    gb_s = res.get("best_cold", {}).get("gb_s")
    if not gb_s:
        return None
    store.save_disk_rate(gb_s, models[0].tag, "layerrun bench io (depth 2, cold, O_DIRECT), during pull")
    return store.disk_rate()


def _gguf_counts(path) -> dict | None:
    """Exact parameter counts (decoder layers / the rest) and the shapes the KV cache needs, from a GGUF header."""
    from layerrun.errors import FormatError
    from layerrun.formats.gguf import read_header

    try:
        h = read_header(path)
    except (FormatError, OSError):
        return None
    layer = other = 0
    for t in h.tensors.values():
        n = 1
        for d in t.shape:
            n *= d
        if t.name.startswith("blk."):
            layer += n
        else:
            other += n
    k = h.arch_key
    heads = int(k("attention.head_count") or 1)
    hidden = int(k("embedding_length") or 0)
    return {"layer_params": layer, "other_params": other, "layers": int(k("block_count") or 0), "hidden": hidden,
            "kv_heads": int(k("attention.head_count_kv") or heads),
            "head_dim": int(k("attention.key_length") or (hidden // heads if hidden else 0))}


def estimate(info: dict) -> dict:
    """Stored bytes, bytes per layer, layers and KV bytes of a pull, from what is known before downloading
    (exact counts from the GGUF header when the file is already here)."""
    from layerrun.formats.store import VARIANTS

    variant = info.get("variant") or ("int4" if info.get("source_format") == "gguf" else "bfloat16")
    local = info.get("local_path")
    counts = _gguf_counts(local) if local and str(local).lower().endswith(".gguf") else None
    if counts:
        elem = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1.06, "int4": 0.625}[variant]
        rest_elem = {"float32": 4}.get(VARIANTS[variant][0], 2)
        kv = 2 * counts["layers"] * counts["kv_heads"] * counts["head_dim"] * KV_CONTEXT * rest_elem
        lb = int(counts["layer_params"] * elem)
        rb = int(counts["other_params"] * rest_elem)
        return {"variant": variant, "stored_bytes": lb + rb, "layer_bytes": lb, "layers": counts["layers"] or None,
                "kv_bytes": kv, "resident_bytes": rb}
    src = info.get("source_bytes") or 0
    cfg = info.get("config") or {}
    cfg = cfg.get("text_config", cfg)
    elem = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1.06, "int4": 0.625}[variant]  # + scales/zeros
    if info.get("source_format") == "gguf":
        params = src / 0.6  # about 4.8 bits a weight for the Q4/Q5 mixes most GGUF files are
    else:
        src_elem = {"float32": 4, "float64": 8}.get(str(cfg.get("torch_dtype") or cfg.get("dtype")), 2)
        params = src / src_elem
    layers = int(cfg.get("num_hidden_layers") or 0)
    hidden, vocab = int(cfg.get("hidden_size") or 0), int(cfg.get("vocab_size") or 0)
    rest_elem = {"float32": 4}.get(VARIANTS[variant][0], 2)
    embed = hidden * vocab * (1 if cfg.get("tie_word_embeddings", True) else 2)
    layer_params = max(params - embed, params * 0.5) if embed else params * 0.9
    stored = layer_params * elem + (params - layer_params) * rest_elem
    kv = 0
    if layers and hidden:
        heads = int(cfg.get("num_attention_heads") or 1)
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        kv = 2 * layers * kv_heads * head_dim * KV_CONTEXT * rest_elem
    return {"variant": variant, "stored_bytes": int(stored), "layer_bytes": int(layer_params * elem),
            "layers": layers or None, "kv_bytes": kv, "resident_bytes": int(stored - layer_params * elem)}


def fit_lines(info: dict, rate: dict | None, avail: int | None = None) -> list[str]:
    """What the user should know before the download: size, the mode it will run in, stream speed."""
    e = estimate(info)
    avail = available_memory() if avail is None else avail
    lines = []
    dl = info.get("download_bytes") or 0
    head = f"{info['name']}: " + ("no download needed (cached)" if info.get("cached") else f"{human_bytes(dl)} to download")
    lines.append(f"{head}; stored as {e['variant']}: about {human_bytes(e['stored_bytes'])}")
    need_full = (e["stored_bytes"] + e["kv_bytes"]) * HEADROOM
    per_layer = e["layer_bytes"] / e["layers"] if e["layers"] else e["layer_bytes"] / 30
    need_stream = (e["resident_bytes"] + 3 * per_layer + e["kv_bytes"]) * HEADROOM
    if need_full <= avail:
        lines.append(f"fits in memory ({human_bytes(avail)} available): runs in full mode, every layer resident")
        streamed = 0.0
    elif need_stream <= avail:
        k = int((avail / HEADROOM - e["kv_bytes"] - e["resident_bytes"] - 3 * per_layer) // max(per_layer, 1))
        k = max(0, min(k, (e["layers"] or 1) - 1))
        streamed = e["layer_bytes"] - k * per_layer
        mode = f"partial mode, about {k} layer{'s' if k != 1 else ''} resident, the rest streamed" if k else "stream mode"
        lines.append(f"larger than the {human_bytes(avail)} available: runs in {mode}")
    else:
        lines.append(f"does not fit: even stream mode needs about {human_bytes(need_stream)} "
                     f"(embeddings, a 3-slot ring, a {KV_CONTEXT}-token KV cache); {human_bytes(avail)} available. "
                     "Try --dtype int4, or a smaller model")
        return lines
    stream_bytes = streamed or e["layer_bytes"]
    if rate:
        tok_s = rate["gb_s"] * 1e9 / max(stream_bytes, 1)
        what = "streamed" if streamed else "in stream mode"
        lines.append(f"{what}: about {tok_s:.2g} tokens/s for one sequence ({human_bytes(stream_bytes)} read per token "
                     f"at this disk's {rate['gb_s']:.2f} GB/s, measured {rate.get('date', '?')[:10]}); "
                     "batched requests share each read")
    else:
        lines.append("stream-mode speed unknown: run `layerrun bench io MODEL` once to measure this disk")
    return lines


# ---- commands ----------------------------------------------------------------------------
def cmd_pull(a) -> int:
    from layerrun.formats.store import pull

    def before(info: dict) -> None:
        for line in fit_lines(info, disk_rate()):
            _err_log(line)

    path = pull(a.name, dtype=a.dtype, progress=not a.quiet, log=_err_log, force=a.force,
                before_download=None if a.no_estimate else before)
    print(path)
    return 0


def cmd_list(a) -> int:
    from layerrun.formats.store import known_models, list_models, usage

    if a.available:
        avail = known_models()
        if a.json:
            print(json.dumps(avail, indent=2, default=str))
            return 0
        from rich.table import Table

        t = Table()
        for col in ("name", "download", "stored as", "pulled", "license", "description"):
            t.add_column(col)
        for m in avail:
            t.add_row(m["name"] + (" (default)" if m.get("default") else ""), f"{m.get('download_mb', '?')} MB",
                      m["variant"], "yes" if m.get("pulled") else "no", m.get("license") or "",
                      str(m.get("description", "")))
        _console().print(t)
        return 0
    models, use = list_models(), usage()
    if a.json:
        print(json.dumps({"models": models, "usage": use} if a.usage else models, indent=2, default=str))
        return 0
    if not models:
        print("no local models; try `layerrun pull smollm2-135m-instruct` (or `layerrun list --available`)")
        return 0
    from rich.table import Table

    t = Table(caption=f"{human_bytes(use['models'])} in models, {human_bytes(use['downloads'])} in downloads, "
                      f"{human_bytes(use['total'])} in all, under {use['home']}", caption_justify="left")
    for col in ("name", "variant", "size", "format", "source", "path"):
        t.add_column(col)
    for m in models:
        t.add_row(m["name"] + (" (default)" if m.get("default") else ""), str(m.get("variant") or "-"),
                  human_bytes(m.get("size", 0)), str(m.get("format", "")), str(m.get("source") or ""), m["path"])
    _console().print(t)
    return 0


def show_info(name: str) -> dict:
    """What `inspect` says about a stored model, plus its tag, size on disk, source and license."""
    from layerrun.formats import store
    from layerrun.formats.inspect import inspect_path
    from layerrun.formats.manifest import Manifest

    m = store.find(name)
    if m is None:
        raise LayerRunError(f"{name}: not in the model store (see `layerrun list`; `layerrun pull {name}` adds it)")
    info = inspect_path(m.folder)
    man = Manifest.read(m.folder)
    src = m.info.get("source") or {}
    info.pop("source", None)
    return {**info, "name": m.name, "tag": m.tag, "variant": m.variant, "size_on_disk": store.folder_bytes(m.folder),
            "source": store.source_label(man, m.info), "source_detail": src or man.source,
            "license": m.info.get("license") or _known_license(m.name), "pulled": m.info.get("pulled"),
            "other_variants": [x.variant for x in store.stored() if x.name == m.name and x.complete
                               and x.variant != m.variant]}


def _known_license(name: str) -> str | None:
    from layerrun.formats.store import KNOWN

    return KNOWN[name].license if name in KNOWN else None


def cmd_show(a) -> int:
    info = show_info(a.name)
    if a.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    from rich.table import Table

    from layerrun.options import human_count

    t = Table(title=info["tag"], show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    skip = {"name", "tag", "tensor_check", "source_detail", "tensor_types", "format"}
    for k, v in info.items():
        if k in skip or v in (None, [], {}):
            continue
        if k == "size_on_disk" or ("bytes" in k and isinstance(v, int)):
            v = human_bytes(v)
        elif k == "bytes_per_layer" and isinstance(v, dict):
            v = human_bytes(v["min"]) + ("" if v["min"] == v["max"] else f" .. {human_bytes(v['max'])}")
        elif k in ("parameters", "active_parameters"):
            v = human_count(v)
        elif isinstance(v, (list, dict)):
            v = json.dumps(v)
        t.add_row(k.replace("_", " "), str(v))
    _console().print(t)
    return 0


def cmd_rm(a) -> int:
    from layerrun.formats.store import remove

    status = 0
    for name in a.names:
        gone = remove(name)
        if not gone:
            print(f"error: {name}: not in the model store (see `layerrun list`)", file=sys.stderr)
            status = 1
        for tag, size in gone:
            print(f"deleted {tag} ({human_bytes(size)})")
    return status


def cmd_import(a) -> int:
    from layerrun.formats.store import import_model

    print(import_model(a.path, a.name, dtype=a.dtype, progress=not a.quiet, log=_err_log, force=a.force))
    return 0


def add_store_parsers(subparsers) -> None:
    """Register ``pull``, ``list``, ``show``, ``rm`` and ``import`` on the CLI's subparsers."""
    from layerrun.formats.store import DTYPE_CHOICES

    dtype_help = ("how the layers are stored: auto (the source's default: 4-bit GGUF -> int4, wider GGUF -> int8, "
                  "safetensors keep their dtype), float32, bfloat16, float16, int8, int4")
    c = subparsers.add_parser("pull", help="fetch and convert a model into the local store",
                              description="Fetch a catalogue model (`layerrun list --available`), a Hugging Face "
                                          "repo ORG/REPO (safetensors) or one GGUF file ORG/REPO:FILE.gguf, and "
                                          "convert it. Says first whether it will fit this machine.")
    c.add_argument("name", help="catalogue name, ORG/REPO or ORG/REPO:FILE.gguf (optionally @VARIANT)")
    c.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=dtype_help)
    c.add_argument("--force", action="store_true", help="convert again even if this variant is stored")
    c.add_argument("--no-estimate", action="store_true", help="skip the will-it-fit estimate before downloading")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=cmd_pull)

    c = subparsers.add_parser("list", help="list local models and their disk usage")
    c.add_argument("--available", action="store_true", help="list the catalogue models `layerrun pull` knows")
    c.add_argument("--usage", action="store_true", help="with --json: also the store's disk usage")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(fn=cmd_list)

    c = subparsers.add_parser("show", help="a stored model: architecture, sizes, size on disk, source, license")
    c.add_argument("name", help="model name (NAME or NAME@VARIANT)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(fn=cmd_show)

    c = subparsers.add_parser("rm", help="delete models from the local store")
    c.add_argument("names", nargs="+", metavar="NAME", help="NAME (every variant) or NAME@VARIANT")
    c.set_defaults(fn=cmd_rm)

    c = subparsers.add_parser("import", help="add a local model to the store under a name",
                              description="A LayerRun folder is copied; a Hugging Face folder or a .gguf file is "
                                          "converted into the store.")
    c.add_argument("path", help="a converted (layered) folder, a Hugging Face folder or a .gguf file")
    c.add_argument("name", help="the name to use it by")
    c.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=dtype_help)
    c.add_argument("--force", action="store_true", help="replace a stored model of the same name and variant")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=cmd_import)
