"""The engine's weights: how one file's tensors become what the model computes with.

:class:`EngineWeights` is mixed into :class:`layerrun.engine.engine.Engine`: reading resident files
(dequantized, cast, fused and wrapped for the compiled kernel / oneDNN), preparing streamed layers
in the I/O threads, viewing fused groups straight from a file's bytes, the embeddings and head
(lease-guarded memory maps), and the progress bar while resident files load.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from layerrun.errors import FileChangedError
from layerrun.formats.aligned import TensorInfo
from layerrun.formats.manifest import FileEntry
from layerrun.io.reader import views
from layerrun.models.fast import FastLinear, available, fast_weights, owned

if TYPE_CHECKING:
    from layerrun.engine.engine import Engine


class EngineWeights:
    """Weights for :class:`~layerrun.engine.engine.Engine` (a mixin: it uses the engine's reader, files,
    manifest, model, dtype and device)."""

    # ---- weights ---------------------------------------------------------
    def _prepare_weights(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn one file's raw tensors into what the model computes with.

        Runs right after the read (in an I/O thread for streamed layers, so it
        overlaps compute): dequantizes quantized layers, casts to the compute
        dtype, and applies the family's ``sanitize``.
        """
        if self.manifest.quantization:
            from layerrun.formats.quant import dequantize_weights

            w = dequantize_weights(w, self.manifest.quantization, self.dtype)
        return self.model.sanitize(self._cast(w))

    def _prepare_streamed(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A streamed layer's weights: prepared, and on the fast kernels where that needs no copy."""
        w = self._prepare_weights(w)
        return fast_weights(w, pack=False) if self._fast_stream else w

    def _view_entry(self, entry: FileEntry) -> FileEntry:
        """``entry`` with each group of tensors the family fuses (``model.fused_groups``: q/k/v, gate/up)
        named as one tensor, its fused product, where the file stores the parts back to back in product
        order with one dtype and input width (and their biases likewise, or none): staging then makes
        one view of the group's bytes, which is the fused weight, with no copy. Other groups (files
        converted before the parts were kept together, a subset without them) stay as they are."""
        tensors, changed = dict(entry.tensors), False
        for parts, fused in getattr(self.model, "fused_groups", ()):
            joined = {}
            for kind, name in zip(("weight", "bias"), fused, strict=True):
                infos = [tensors.get(f"{p}.{kind}") for p in parts]
                if kind == "bias" and all(t is None for t in infos):
                    continue
                t0 = infos[0]
                if (any(t is None for t in infos) or len({(t.dtype, len(t.shape), t.shape[1:]) for t in infos}) != 1
                        or len(t0.shape) != (2 if kind == "weight" else 1)
                        or any(a.end != b.start for a, b in zip(infos, infos[1:]))):
                    joined = None
                    break
                shape = (sum(t.shape[0] for t in infos), *t0.shape[1:])
                joined[name] = TensorInfo(name, t0.dtype, shape, t0.start, infos[-1].end)
            if joined:
                for p in parts:
                    tensors.pop(f"{p}.weight")
                    tensors.pop(f"{p}.bias", None)
                tensors.update(joined)
                changed = True
        if not changed:
            return entry
        return FileEntry(entry.name, entry.kind, entry.bytes, entry.sha256, tensors, entry.layer)

    def _load_ends(self, stored: torch.dtype) -> tuple[dict, dict]:
        """The embeddings and the final norm / head, resident.

        A tied head (the embedding matrix) in bfloat16 runs 2.2x faster packed for oneDNN, but the
        packed copy cannot serve embedding lookups. When the file is stored in the compute dtype, the
        embeddings are then a memory map of it (a lookup touches a few rows; nothing is copied) and
        the packed head the one copy in memory, as many bytes as the embeddings took before. The map is
        lease-guarded (``self.files``): a lookup touches its pages only while acquired (:meth:`_embed`), so
        a file truncated under the process is an error naming it, never SIGBUS; where no lease can be
        had, the embeddings are a private copy.
        """
        final = self._load_resident(self.manifest.final)
        tied = "lm_head.weight" not in final
        self._emb_map = None
        if self.fast and tied and self.dtype == stored == torch.bfloat16 and available(self.dtype):
            e = self.manifest.embeddings
            m = self.files.mapped(e)
            if m is not None and m.acquire():
                try:
                    emb = self.model.sanitize(views(e, m.tensor, 0))
                    final["lm_head.weight"] = FastLinear(emb["embed_tokens.weight"], pack=True)
                finally:
                    m.release()
                m.drop()  # packing read every row; lookups need a few
                self._emb_map = m
                self._loading.advance(e.bytes - e.data_start, e.name)
                return emb, final
        emb = self._load_resident(self.manifest.embeddings, pack=False)
        if self.fast and tied and "embed_tokens.weight" in emb:
            head = fast_weights({"lm_head.weight": emb["embed_tokens.weight"]}, pack=False)["lm_head.weight"]
            if isinstance(head, FastLinear):  # float32: oneDNN on the same tensor, no copy
                final["lm_head.weight"] = head
        return emb, final

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embeddings of ``ids`` (a new tensor). Mapped embeddings are touched only under their
        lease; a file that changed since is checked and mapped again (FileChangedError if it is not the
        manifest's any more)."""
        m = self._emb_map
        if m is None:
            return self.model.embed(self.embeddings, ids)
        for _ in range(3):
            if m.acquire():
                try:
                    return self.model.embed(self.embeddings, ids)
                finally:
                    m.release()
            e = self.manifest.embeddings
            m = self.files.mapped(e)
            if m is None:  # no lease any more: a private copy
                w, _ = self.reader.read(e)
                self.embeddings, self._emb_map = self.model.sanitize(w), None
                return self.model.embed(self.embeddings, ids)
            self.embeddings, self._emb_map = self.model.sanitize(views(e, m.tensor, 0)), m
        raise FileChangedError(f"{self.path / self.manifest.embeddings.name}: the model file keeps changing on "
                               "disk; requests that need it fail until it is left alone")

    def _cast(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.to(self.dtype) if v.is_floating_point() and v.dtype != self.dtype else v) for k, v in w.items()}

    def _load_resident(self, entry, names: list[str] | None = None, pack: bool = True) -> dict[str, torch.Tensor]:
        """A file's tensors (or only ``names``, read alone and owned), on the compute device, prepared
        (and with ``pack``, the linear weights packed for oneDNN on CPU)."""
        t0 = time.perf_counter()
        w, rs = self.reader.read(entry) if names is None else self.reader.read_tensors(entry, names)
        if self.throttle:
            self.throttle.wait(rs.bytes, t0)
        w = {k: v.to(self.device) for k, v in w.items()} if self.device.type != "cpu" else w
        self.trace.read(entry.layer if entry.layer is not None else -1, entry.name, t0, time.perf_counter(), rs.bytes, resident=True)
        w = self._prepare_weights(w)
        self._loading.advance(rs.bytes, entry.name)
        if not (self.fast and pack):
            return w
        fuse = getattr(self.model, "fuse", None)
        return owned(fast_weights(fuse(w) if fuse is not None else w, pack=True))


class _LoadProgress:
    """``progress=True``: a progress bar on stderr while resident files load (a terminal only), then one line."""

    MIN_BYTES = 64 * 2**20  # smaller loads take well under a second: say nothing

    def __init__(self, engine: Engine, enabled: bool):
        self.bar = None
        self.t0 = time.perf_counter()
        plan, m = engine.plan, engine.manifest
        self.total = m.embeddings.bytes + m.final.bytes + sum(m.layer(i).bytes for i in plan.resident)
        self.total += sum(m.layer(i).tensors[n].nbytes for i in plan.dense_resident for n in engine._dense_names[i])
        self.done = 0
        if not enabled or self.total < self.MIN_BYTES:
            return
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self.bar = Progress(TextColumn("[bold]loading[/] {task.description}"), BarColumn(), DownloadColumn(),
                            TimeRemainingColumn(), transient=True, console=console)
        self.bar.start()
        self.task = self.bar.add_task(engine.path.name, total=self.total)

    def advance(self, nbytes: int, name: str) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(self.task, advance=nbytes, description=name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            import sys

            print(f"loaded {self.done / 1e6:.0f} MB in {time.perf_counter() - self.t0:.1f} s", file=sys.stderr)


def _trim_heap() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``): after the resident weights were
    fused and packed, the intermediate copies' memory otherwise stays in this process's RSS (Gemma 3
    270M bf16: 185 MB). A no-op where glibc is not the allocator."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
