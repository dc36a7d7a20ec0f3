"""Models from the Hugging Face Hub, through ``huggingface_hub`` and its standard cache.

``ORG/REPO`` is a safetensors repository (configs, tokenizer, weights);
``ORG/REPO:FILE.gguf`` is one GGUF file of a repository. Files land where every
other Hugging Face tool keeps them (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
else ``~/.cache/huggingface/hub``), so a model already downloaded by
transformers, llama.cpp's scripts or ``hf download`` is not fetched again, and
with ``HF_HUB_OFFLINE=1`` a cached model pulls with no network at all.

:func:`plan` says what a pull would download (file sizes, the config) before
anything large is fetched, so the caller can say whether the model will fit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from layerrun.errors import LayerRunError

REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
SMALL = ["*.json", "tokenizer*", "*.jinja", "README.md", "LICENSE*"]  # configs, tokenizer, chat template, card


@dataclass
class HubRef:
    repo: str
    filename: str | None = None  # a GGUF file inside the repo

    @property
    def name(self) -> str:
        return self.repo + (f":{self.filename}" if self.filename else "")


def parse(name: str) -> HubRef | None:
    """``org/repo`` or ``org/repo:file.gguf`` (the file may sit in a folder of the repo), else None."""
    repo, _, filename = name.partition(":")
    if not REPO_RE.fullmatch(repo):
        return None
    if filename:
        if not filename.lower().endswith(".gguf") or ".." in filename.split("/") or filename.startswith("/"):
            return None
        return HubRef(repo, filename)
    return HubRef(repo)


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401 - a lazily loaded submodule
    except ImportError:
        raise LayerRunError("pulling from the Hugging Face Hub needs huggingface_hub (pip install huggingface_hub)") from None
    return huggingface_hub


def offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub read it."""
    return bool(_hub().constants.HF_HUB_OFFLINE)


def cache_dir() -> Path:
    return Path(_hub().constants.HF_HUB_CACHE)


@dataclass
class Plan:
    """What a pull of ``ref`` involves, known before the weights are fetched."""

    ref: HubRef
    files: dict[str, int] = field(default_factory=dict)  # weight files -> bytes (0 where unknown)
    config: dict | None = None  # config.json of a safetensors repo
    cached: bool = False  # every weight file is in the cache already
    license: str | None = None
    local_path: Path | None = None  # the cached GGUF file or snapshot folder

    @property
    def download_bytes(self) -> int:
        return 0 if self.cached else sum(self.files.values())


def _cached_snapshot(repo: str) -> Path | None:
    """The cached snapshot of ``repo``'s main revision, if any (the layout huggingface_hub writes)."""
    folder = cache_dir() / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / "main"
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    snap = folder / "snapshots" / commit
    return snap if re.fullmatch(r"[0-9a-f]{40}", commit) and snap.is_dir() else None


def _license_of(readme: Path | None) -> str | None:
    """The ``license:`` of a model card's YAML front matter."""
    if readme is None or not readme.is_file():
        return None
    try:
        text = readme.read_text(errors="replace")[:20000]
    except OSError:
        return None
    m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    if not m:
        return None
    lic = re.search(r"^license:\s*(\S.*)$", m.group(1), re.M)
    return lic.group(1).strip().strip("'\"") if lic else None


def plan(ref: HubRef) -> Plan:
    """File sizes and config of a pull, from the cache or (online) the Hub's metadata and small files."""
    p = Plan(ref)
    snap = _cached_snapshot(ref.repo)
    if snap is not None:
        if ref.filename:
            f = snap / ref.filename
            if f.is_file():
                p.files, p.cached, p.local_path = {ref.filename: f.stat().st_size}, True, f
        else:
            weights = sorted(x for x in snap.rglob("*.safetensors"))
            if weights:
                p.files = {str(w.relative_to(snap)): w.stat().st_size for w in weights}
                p.cached, p.local_path = True, snap
            if (snap / "config.json").is_file():
                p.config = _json(snap / "config.json")
        p.license = _license_of(snap / "README.md")
        if p.cached:
            return p
    if offline():
        return p  # the pull itself says what is missing
    hub = _hub()
    try:
        info = hub.HfApi().model_info(ref.repo, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many types (HTTP, not found, gated, connection)
        raise _hub_error(ref, e) from None
    siblings = {s.rfilename: (s.size or 0) for s in info.siblings or []}
    card = getattr(info, "card_data", None) or getattr(info, "cardData", None)
    lic = card.get("license") if hasattr(card, "get") else None
    p.license = p.license or (str(lic) if lic else None)
    if ref.filename:
        if ref.filename not in siblings:
            ggufs = sorted(n for n in siblings if n.lower().endswith(".gguf"))
            raise LayerRunError(f"{ref.repo} has no file {ref.filename}; its GGUF files: {', '.join(ggufs) or 'none'}")
        p.files = {ref.filename: siblings[ref.filename]}
        return p
    p.files = {n: s for n, s in siblings.items() if n.endswith(".safetensors")}
    if not p.files:
        raise _no_safetensors(ref, list(siblings))
    try:
        p.config = _json(Path(hub.hf_hub_download(ref.repo, "config.json")))
    except Exception:  # noqa: BLE001 - the pull itself reports a missing config
        p.config = None
    return p


def fetch(ref: HubRef) -> Path:
    """The local path of the GGUF file or the snapshot folder (downloaded into the cache if needed)."""
    hub = _hub()
    try:
        if ref.filename:
            return Path(hub.hf_hub_download(ref.repo, ref.filename))
        folder = Path(hub.snapshot_download(ref.repo, allow_patterns=[*WEIGHTS, *SMALL]))
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many types (HTTP, offline, gated, not found)
        raise _hub_error(ref, e) from None
    if not any(folder.rglob("*.safetensors")):
        raise _no_safetensors(ref, [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()])
    return folder


def license_of(ref: HubRef, path: Path) -> str | None:
    folder = path if path.is_dir() else _cached_snapshot(ref.repo)
    return _license_of(folder / "README.md") if folder is not None else None


def _json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _no_safetensors(ref: HubRef, files: list[str]) -> LayerRunError:
    ggufs = sorted(n for n in files if n.lower().endswith(".gguf"))
    if ggufs:
        return LayerRunError(f"{ref.repo} holds GGUF files, not safetensors: pull one as {ref.repo}:FILE.gguf "
                             f"(its files: {', '.join(ggufs[:8])}{' ...' if len(ggufs) > 8 else ''})")
    return LayerRunError(f"{ref.repo} has no .safetensors weights to convert (LayerRun reads safetensors and GGUF)")


def _hub_error(ref: HubRef, e: Exception) -> LayerRunError:
    kind = type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0][:200]
    if offline() or kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return LayerRunError(
            f"{ref.name} is not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE is set: "
            "pull it once with network access (or unset HF_HUB_OFFLINE)")
    if kind in ("RepositoryNotFoundError", "GatedRepoError"):
        return LayerRunError(f"{ref.repo}: not found on the Hugging Face Hub, or gated/private "
                             "(log in with `hf auth login` if you have access)")
    if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return LayerRunError(f"{ref.repo} has no file {ref.filename}")
    return LayerRunError(f"could not download {ref.name} from the Hugging Face Hub ({kind}: {first}); "
                         "check the repo id and the network connection, or set HF_HUB_OFFLINE=1 to use the cache only")
