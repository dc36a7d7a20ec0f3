"""The engine: loads a layered model and runs its forward pass, streaming layers from disk.

:class:`Engine` owns the weights (resident or streamed through the pipeline), the memory plan
and the forward pass (``_forward``: one pass of every layer over a block of new tokens, with
an optional KV cache). ``Engine.logits`` runs a plain forward pass for validation. Generation
(``stream``, ``generate``, batches) lives in :mod:`layerrun.engine.generation`, mixed in here,
and drives the one generation loop in :mod:`layerrun.engine.batch`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from layerrun.engine.draft import open_draft
from layerrun.engine.generation import BATCH_FIELDS, DEFAULT_MAX_NEW_TOKENS, Chunk, Generation, GenerationAPI
from layerrun.engine.kv_cache import KVCache
from layerrun.engine.model_files import check_model_files, load_config
from layerrun.engine.speculative import Speculator
from layerrun.engine.telemetry import GenerationStats, peak_rss_bytes
from layerrun.engine.threads import apply_threads
from layerrun.engine.tokenizer import Tokenizer
from layerrun.engine.trace import TraceRecorder
from layerrun.errors import FileChangedError, FormatError, LayerRunError
from layerrun.formats.aligned import TensorInfo
from layerrun.formats.convert import DTYPES
from layerrun.formats.integrity import Verifier
from layerrun.formats.manifest import FileEntry, Manifest
from layerrun.io.guard import ModelFiles
from layerrun.io.pipeline import LayerStream
from layerrun.io.reader import FileReader, views
from layerrun.models.base import expert_index
from layerrun.models.fast import FastLinear, available, fast_weights, owned, streams_fast

__all__ = ["BATCH_FIELDS", "DEFAULT_MAX_NEW_TOKENS", "Chunk", "Engine", "Generation", "resolve_model_path"]
DEFAULT_PREFETCH = 2
DEFAULT_CONTEXT = 4096  # KV reservation when the caller does not say
MAX_DRAFT_NODES = 1024


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise LayerRunError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if device not in ("cpu", "cuda"):
        raise LayerRunError(f"--device {device!r} is not one of: cpu, cuda, auto")
    return torch.device(device)


def resolve_model_path(path: str | Path) -> Path:
    """A folder path, the name of a model in the local store, or a ``.gguf`` file (converted into the
    store on first use, with a message and a progress bar on stderr)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        import sys

        from layerrun.formats.store import ensure_gguf

        return ensure_gguf(p, progress=True, log=lambda s: print(s, file=sys.stderr))
    if p.exists():
        return p
    try:
        from layerrun.formats.store import resolve_name
    except ImportError:
        resolve_name = None
    if resolve_name is not None:
        found = resolve_name(str(path))
        if found is not None:
            return found
    raise FormatError(f"{path}: no such model folder (nor a model name in the local store; see `layerrun list`)")


class Engine(GenerationAPI):
    """A loaded layered model.

    Options (all keyword): ``mode`` ("auto" picks from free memory; "stream":
    nothing resident; "partial": some layers resident; "full": all resident),
    ``max_memory`` (bytes or "1.5GiB": a budget for the whole process),
    ``prefetch`` (layers read ahead of compute), ``throttle`` (bytes/s or
    "200MB/s", to simulate a slow disk), ``device`` ("cpu", "cuda", "auto"),
    ``reader`` ("pread", "direct", "mmap"), ``dtype`` (compute dtype; default:
    the stored dtype, float16 -> float32 on CPU), ``context`` and
    ``batch_size`` (what the KV cache reservation is planned for), ``verify``
    (default True: every file's sha256 and NaN/Inf are checked before its bytes are first used,
    once per file until it changes, :mod:`layerrun.formats.integrity`; False skips it), ``trace`` (record a Perfetto trace of
    reads and compute, written by ``engine.trace.write(path)``), ``experts``
    (mixture-of-experts models: "routed" reads only the experts a step routes
    to in streamed layers; "all" reads whole layers ahead like any other model),
    ``kv_cache`` ("auto": the governor decides; "device": with the layers on the
    compute device; "host": in host memory, each layer's part brought to the
    device for its compute and prefetched while the layer before computes),
    ``threads`` (torch's compute threads for the process: a number, or "auto" / None for
    :func:`layerrun.engine.threads.default_threads`), ``fast`` (CPU: oneDNN's linear kernel with
    resident weights packed for it, :mod:`layerrun.models.fast`; False keeps plain ``F.linear``).

    Speculative decoding: ``draft`` ("ngram", or a layered model folder or store name with the
    same tokenizer: a smaller sibling, or an int8/int4 copy of this model, loaded in full mode on
    the compute device) proposes token trees that each target pass verifies
    (:mod:`layerrun.engine.speculative`); ``draft_nodes`` caps a tree's drafted tokens (the
    engine sizes each tree up to it from measured costs; ``draft_fixed=True`` always grows it to
    the cap). Generation calls take ``speculate=False`` to decode without it.

    ``stage`` (a :class:`~layerrun.engine.stages.Stage`, under ``torchrun``): this process runs only the
    stage's layers, :mod:`layerrun.engine.distributed`.
    """

    def __init__(
        self,
        path: str | Path,
        mode: str = "auto",
        max_memory: int | str | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        throttle: float | str | None = None,
        device: str = "auto",
        reader: str = "auto",
        dtype: str | None = None,
        context: int | None = None,
        batch_size: int = 1,
        verify: bool = True,
        trace: bool = False,
        experts: str = "routed",
        kv_cache: str = "auto",
        draft=None,
        draft_nodes: int | None = None,
        draft_fixed: bool = False,
        threads: int | str | None = None,
        fast: bool = True,
        progress: bool = False,
        stage=None,
    ):
        from layerrun.engine.governor import DEFAULT_RESERVE, plan_memory, tame_allocator
        from layerrun.io.throttle import Throttle, parse_size

        tame_allocator()  # freed activations and caches go back to the system (the governor counts on it)
        self.path = resolve_model_path(path)
        self.manifest = Manifest.read(self.path)
        self.config, self.model = load_config(self.path)
        self.args = self.model.args
        if self.manifest.num_layers != self.args.num_hidden_layers:
            raise FormatError(
                f"{self.path}: manifest has {self.manifest.num_layers} layers, config.json says {self.args.num_hidden_layers}"
            )
        self.stage = stage
        (stage or _Whole).check_model_files(self.path, self.manifest, self.model)  # before anything is sized by them
        # Every file's bytes are checked (sha256, NaN/Inf) before their first use, unless a stamp vouches for them.
        self.verifier = Verifier(self.path) if verify else None
        self.device = _pick_device(device)
        self.threads = apply_threads(threads, self.device)
        stored = DTYPES.get(self.manifest.dtype, torch.float32)
        notes = []
        if dtype is None:
            self.dtype = stored
            if stored == torch.float16 and self.device.type == "cpu":
                self.dtype = torch.float32
                notes.append("float16 weights are computed in float32 on CPU")
        else:
            if dtype not in DTYPES:
                raise LayerRunError(f"dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
            self.dtype = DTYPES[dtype]
        self.notes = notes
        self.fast = bool(fast) and self.device.type == "cpu"
        # Streamed layers are not packed (a copy per read): the compiled kernel or float32 oneDNN runs them as read.
        self._fast_stream = self.fast and streams_fast(self.dtype)
        if experts not in ("routed", "all"):
            raise LayerRunError(f"--experts {experts!r} is not one of: routed, all")
        budget = parse_size(max_memory, "--max-memory") if max_memory is not None else None
        self.throttle = Throttle(parse_size(throttle, "--throttle")) if throttle else None
        if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
            raise LayerRunError(f"--context must be a positive number of tokens, got {context!r}")
        # A context past the model's own buys nothing but a larger KV reservation.
        self.context = min(int(context or DEFAULT_CONTEXT), self.args.max_position_embeddings)
        if batch_size < 1:
            raise LayerRunError(f"--batch-size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.draft, self.speculator = None, None
        self._tokenizer: Tokenizer | None = None
        draft_lines = []
        if draft is not None:
            if draft_nodes is not None and not 1 <= int(draft_nodes) <= MAX_DRAFT_NODES:
                raise LayerRunError(f"--draft-nodes must be in 1..{MAX_DRAFT_NODES}, got {draft_nodes}")
            self.draft = open_draft(draft, self)
            self.draft.check_tokenizer(self)
            self.speculator = Speculator(self.draft, draft_nodes, fixed=draft_fixed)
            need = getattr(getattr(self.draft, "engine", None), "plan", None)
            if need is not None:
                draft_lines.append(f"draft model resident: {need.need / 2**20:.0f} MiB (weights, its KV cache, workspace)")
                if budget is not None:
                    budget -= need.need  # the budget is for the whole process
        cast_factor = self.dtype.itemsize / stored.itemsize if self.dtype != stored else 1.0
        self._tokenizer: Tokenizer | None = None
        if self.has_tokenizer:  # loaded now, so that the governor's measured baseline includes it
            try:
                self.tokenizer  # noqa: B018
            except LayerRunError:
                pass  # said again, where it is used
        # The KV cache is planned for each sequence's first DEFAULT_RESERVE tokens and grows on demand.
        self._mode_asked = mode
        self._plan_kw = dict(
            prefetch=prefetch, device=self.device.type, elem_bytes=self.dtype.itemsize, cast_factor=cast_factor,
            kv=kv_cache, moe_dense=getattr(self.model, "moe", False) and experts == "routed",
        )
        self.plan = (stage.plan_memory if stage is not None else plan_memory)(
            self.manifest, self.args, mode=mode, max_memory=budget, batch=batch_size,
            context=min(self.context, DEFAULT_RESERVE), **self._plan_kw)
        self.mode = self.plan.mode
        self.explain_lines = list(self.plan.lines) + draft_lines + (self.speculator.rule() if self.speculator else [])
        self.kv_host = self.plan.kv_location == "host"
        self.reader_backend = self._pick_reader(reader)
        # Resident weights are private copies (pread; O_DIRECT where the streamed layers are read so): a
        # mapped page of a file that later shrinks would kill the process. Streamed layers (and a bfloat16
        # tied head's embeddings) may be mapped, under the guard of ``self.files``.
        self.reader = FileReader(self.path, "direct" if self.reader_backend == "direct" else "pread", self.verifier)
        self.files = ModelFiles(self.path, verifier=self.verifier)
        # Streamed MoE layers: expert -> its tensor names, and the names of everything else (staged ahead).
        self.expert_groups, self._dense_names = self._split_experts() if experts == "routed" else ({}, {})
        self._expert_bytes = {  # per streamed MoE layer: the bytes of all its experts
            i: sum(self.manifest.layer(i).tensors[n].nbytes for names in per.values() for n in names)
            for i, per in self.expert_groups.items()
        }
        self.trace = TraceRecorder(enabled=trace)
        self._lock = threading.RLock()
        self._scheduler = None

        # Embeddings and final norm/head are used every step and stay resident.
        self._loading = _LoadProgress(self, progress)
        try:
            self.embeddings, self.final = self._load_ends(stored) if stage is None or stage.rank == 0 else ({}, {})
            self._resident: dict[int, dict[str, torch.Tensor]] = {}
            for i in self.plan.resident:
                self._resident[i] = self._load_resident(self.manifest.layer(i))
            # Mixture of experts: attention, norms and router of these streamed layers stay resident.
            self._dense: dict[int, dict[str, torch.Tensor]] = {}
            for i in self.plan.dense_resident:
                self._dense[i] = self._load_resident(self.manifest.layer(i), self._dense_names[i])
        finally:
            self._loading.close()
        self._stream: LayerStream | None = None
        self._open_stream()
        if self.fast:
            _trim_heap()  # fusing and packing freed a copy of each resident weight
        if stage is not None:
            stage.attach(self)  # every rank has loaded its layers (or the start fails on all of them)

    def _pick_reader(self, reader: str) -> str:
        """``auto``: mmap when the streamed layers fit in the page cache next to everything else
        (no copy: 2.6-2.7x pread's tokens/s warm, bench/RESULTS.md); O_DIRECT otherwise: the
        streamed layers do not stay cached, so every token reads them from disk, and through the
        page cache that is a copy more and, under a memory limit, a fight for the little cache left
        (bench/RESULTS.md: partial mode in a cgroup); pread under ``--throttle``, which only
        explicit reads can honour."""
        if reader != "auto":
            if reader not in ("pread", "direct", "mmap"):
                raise LayerRunError(f"--reader {reader!r} is not one of: auto, pread, direct, mmap")
            if reader == "mmap" and self.throttle and self.plan.streamed:
                self.notes.append("--throttle does not apply to --reader mmap (pages are faulted in by compute)")
            return reader
        if self.throttle:
            return "pread"  # a throttle simulates a slow disk: reads must be explicit for it to apply
        import psutil

        from layerrun.engine.governor import cgroup_memory_limit

        streamed = sum(self.manifest.layer(i).bytes for i in self.plan.streamed)
        if not streamed or self.device.type != "cpu":
            return "pread"
        room = psutil.virtual_memory().available
        limit = cgroup_memory_limit()
        if limit is not None:
            room = min(room, limit - psutil.Process().memory_info().rss)
        if self.plan.budget and self.plan.mode != "full":
            room = min(room, self.plan.budget)  # a budget below the model means: do not map it all
        return "mmap" if streamed + self.plan.need < 0.8 * room else "direct"

    def _split_experts(self) -> tuple[dict[int, dict[int, list[str]]], dict[int, list[str]]]:
        """For each streamed mixture-of-experts layer: (expert -> its tensor names, the other names)."""
        groups: dict[int, dict[int, list[str]]] = {}
        dense: dict[int, list[str]] = {}
        if not getattr(self.model, "moe", False):
            return groups, dense
        for i in self.plan.streamed:
            per: dict[int, list[str]] = {}
            rest: list[str] = []
            for name in self.manifest.layer(i).tensors:
                j = expert_index(name)
                if j is None:
                    rest.append(name)
                else:
                    per.setdefault(j, []).append(name)
            if per:
                groups[i], dense[i] = per, rest
        return groups, dense

    def new_cache(self) -> KVCache:
        """An empty KV cache, placed where the governor decided (``plan.kv_location``)."""
        if self.stage is not None:
            return self.stage.new_cache(self)
        return KVCache(self.args.num_hidden_layers, host_device=self.device if self.kv_host else None)

    def _expect_all_experts(self, tokens: int) -> bool:
        """Whether a step of ``tokens`` tokens is expected to route to nearly every expert (>= 90% with
        uniform routing), so reading whole layers ahead of compute beats reading experts after routing
        (which waits on the disk). Staging follows this from the next layer read on; either way the
        step computes the same thing."""
        m = self.model
        return 1.0 - (1.0 - m.top_k / m.n_experts) ** tokens >= 0.9

    def _open_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None
        if self.plan.streamed:
            self._stream = LayerStream(
                self.path, [self.manifest.layer(i) for i in self.plan.streamed], depth=self.plan.prefetch,
                backend=self.reader_backend, throttle=self.throttle, device=self.device,
                prepare=self._prepare_streamed, clock_origin=self.trace.origin, files=self.files,
                view_entry=self._view_entry if self.fast and not self.manifest.quantization else None,
                subsets={  # staged ahead: what is neither an expert nor resident already
                    self.manifest.layer(i).name: [] if i in self._dense else names
                    for i, names in self._dense_names.items()
                },
                verifier=self.verifier,
            )

    # ---- files that change on disk ---------------------------------------------
    def file_problems(self) -> dict[str, str]:
        """Model files found changed on disk (truncated, rewritten, replaced) and not restored since:
        file name -> what is wrong. Requests that need them fail until they are restored."""
        return self.files.problems()

    def recheck_files(self) -> dict[str, str]:
        """Check again the files with a recorded problem (a restored file is picked up again: the
        pipeline restarts, dropping reads made while it was damaged); returns the problems left."""
        before = self.files.problems()
        if not before:
            return before
        left = self.files.recheck(self.manifest.files)
        if len(left) < len(before):
            with self._lock:
                self._open_stream()
        return left

    # ---- memory for sequences ---------------------------------------------------
    def _sequences_need(self, rows: int, step_tokens: int, keys: int) -> int:
        from layerrun.engine.governor import sequences_need

        return sequences_need(self.args, rows, step_tokens, keys, self.dtype.itemsize)

    def room_for(self, rows: int, step_tokens: int, keys: int) -> bool:
        """Whether ``rows`` sequences whose cache reaches ``keys`` positions, in a step of ``step_tokens``
        tokens, fit in the memory the weights leave (the governor's ``plan.room``). A mode the caller
        forced to ``full`` is not held to the budget (it was warned about at load)."""
        if self._mode_asked == "full":
            return True
        if self.stage is not None:  # torchrun: every stage's own range against its own room
            return self.stage.room_for(self, rows, step_tokens, keys)
        return self._sequences_need(rows, step_tokens, keys) <= self.plan.room

    def make_room(self, rows: int, step_tokens: int, keys: int) -> None:
        """Grow the KV cache's reservation for a sequence that does not fit as the engine stands: plan
        again with it (the budget measured at load) and stream the resident layers the new plan no
        longer keeps. Only where the mode was left to the governor (auto, partial). Under torchrun every
        stage does so for its own range (rank 0 asks the others: :meth:`Stage.make_room`)."""
        if self.stage is not None:
            self.stage.make_room(self, rows, step_tokens, keys)
        else:
            self.demote_for(rows, step_tokens, keys)

    def demote_for(self, rows: int, step_tokens: int, keys: int) -> None:
        """This process's part of :meth:`make_room` (under torchrun: this rank's range)."""
        from layerrun.engine.governor import fmt, plan_memory

        if self.stage is not None and self.stage.shrink_ring(self, rows, keys):
            return
        if self._mode_asked not in ("auto", "partial") or not self.plan.resident or self._dense:
            return
        planner = self.stage.plan_memory if self.stage is not None else plan_memory
        try:
            new = planner(self.manifest, self.args, mode=self._mode_asked, batch=rows, context=keys,
                          budget=self.plan.budget, baseline=self.plan.baseline, **self._plan_kw)
        except LayerRunError:
            new = None
        old = self.plan.resident
        k = min(len(new.resident), len(old)) if new is not None else 0
        if k == len(old):
            return
        for i in old[k:]:
            self._resident.pop(i, None)
        streamed = sorted(old[k:] + self.plan.streamed)
        need = (self._sequences_need(rows, step_tokens, keys) if self.stage is None
                else self.stage.need(self, self.stage.rank, rows, step_tokens, keys))
        line = (f"the KV cache grew to {rows} x {keys} tokens ({fmt(need)} with workspace): layers {old[k]}..{old[-1]} "
                f"are streamed from now on, {k} of {len(old) + len(self.plan.streamed)} stay resident")
        base = new if new is not None else self.plan
        self.plan = type(base)(
            "partial" if k else "stream", old[:k], streamed, base.prefetch, base.kv_location,
            base.budget, base.need, base.lines + [line], baseline=base.baseline, reserve=(rows, keys),
            reserved=base.reserved)
        self.mode = self.plan.mode
        self.notes.append(line)
        self._open_stream()

    def check_memory(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a sequence that could not run alone even with every layer streamed, naming the figures."""
        from layerrun.engine.governor import fmt, plan_memory

        keys = prompt_tokens + max_new_tokens
        if self._mode_asked == "full" or self.room_for(1, prompt_tokens, keys):
            return
        if self.stage is not None:  # torchrun: each stage's range against what its rank could make room for
            return self.stage.check_memory(self, prompt_tokens, max_new_tokens)
        mode = "stream" if self._mode_asked == "stream" else "auto"
        try:
            bare = plan_memory(self.manifest, self.args, mode="stream", batch=1, context=1, budget=self.plan.budget,
                               baseline=self.plan.baseline, **{**self._plan_kw, "prefetch": self.plan.prefetch})
        except LayerRunError:
            return  # not even one token: loading would have refused; nothing better to say here
        # auto/partial: every resident layer could be streamed for it (make_room); else the plan stands
        room = bare.room if mode == "auto" and not self._dense else self.plan.room
        need = self._sequences_need(1, prompt_tokens, keys)
        if need <= room:
            return
        fit = 0
        lo, hi = prompt_tokens + 1, keys
        while lo <= hi:  # the longest sequence that fits (needs grow with its length)
            mid = (lo + hi) // 2
            if self._sequences_need(1, prompt_tokens, mid) <= room:
                fit, lo = mid, mid + 1
            else:
                hi = mid - 1
        what = (f"at most {fit - prompt_tokens} new tokens (max_tokens / --max-new-tokens)" if fit > prompt_tokens
                else "a shorter prompt")
        raise LayerRunError(
            f"this request needs {fmt(need)} of KV cache and workspace ({prompt_tokens} prompt tokens + up to "
            f"{max_new_tokens} new); the memory budget leaves {fmt(room)} for them with "
            f"{'every layer streamed' if mode == 'auto' else 'the layers as planned'}. Would fit: {what}, "
            "or more memory for the process")

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

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.path)
        return self._tokenizer

    # ---- forward ---------------------------------------------------------
    @torch.inference_mode()
    def _forward(
        self,
        ids: torch.Tensor,
        cache: KVCache | None,
        positions: torch.Tensor,
        key_valid: torch.Tensor | None,
        stats: GenerationStats,
        last_only: bool,
        collect: list | None = None,
        tree: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass of every layer over ``ids`` (B, T); returns float32 logits (B, T or 1, V).

        ``tree`` (bool (B, T, R)): the new tokens are a token tree (see ``models.base.build_mask``);
        ``select`` (long (N,), flat indices into B*T): return logits (N, V) of those tokens only.
        """
        if self.stage is not None:  # torchrun: this rank's layers, then the other stages'
            return self.stage.forward(self, ids, cache, positions, key_valid, stats, last_only, collect, tree=tree,
                                      select=select)
        past = cache.length if cache is not None else 0
        ids, positions = ids.to(self.device), positions.to(self.device)
        if key_valid is not None:
            key_valid = key_valid.to(self.device)
        step_t0 = time.perf_counter()
        x = self._embed(ids)
        if collect is not None:
            collect.append(x.float().cpu())
        if tree is None:
            ctx = self.model.prepare(positions, key_valid, past + ids.shape[1], self.dtype)
        else:
            ctx = self.model.prepare(positions, key_valid, past + ids.shape[1], self.dtype, tree=tree.to(self.device))
        x = self._run_layers(range(self.args.num_hidden_layers), x, cache, ctx, stats, collect)
        if select is not None:
            x = x.reshape(-1, x.shape[-1])[select.to(self.device)][None]  # (1, N, H)
        elif last_only:
            x = x[:, -1:]
        t0 = time.perf_counter()
        out = self.model.head(self.final, x, self.embeddings).float()
        # One cheap check a step: NaN/Inf never reaches the sampler. A sum is NaN/Inf if any term is, 30x
        # faster than isfinite().all() (a 262k-entry row: 28 vs 770 us); only then the exact check, so finite
        # logits whose sum overflows are not refused.
        if not torch.isfinite(out.sum()) and not torch.isfinite(out).all():
            raise self._nonfinite_error()
        if select is not None:
            out = out[0]  # (N, V)
        stats.compute_s += time.perf_counter() - t0
        stats.steps += 1
        stats.step_s += time.perf_counter() - step_t0
        return out

    def _run_layers(self, layers: range, x: torch.Tensor, cache, ctx, stats: GenerationStats,
                    collect: list | None = None) -> torch.Tensor:
        """Run ``layers`` on the hidden states ``x``: resident weights, or the pipeline's next staged layer
        (reads, stalls, computes and copies counted in ``stats`` and the trace). The loop of
        :meth:`_forward`, and of one torchrun stage's range (:func:`layerrun.engine.stage_parts.run_layers`)."""
        stream = self._stream
        if self.expert_groups:
            stream.whole = self._expect_all_experts(x.shape[0] * x.shape[1])
        try:
            for i in layers:
                staged = None
                if i in self._resident:
                    w = self._resident[i]
                else:
                    t_wait = time.perf_counter()
                    staged = stream.next()
                    stall = time.perf_counter() - t_wait
                    if staged.layer != i:  # the cyclic schedule lost sync: a bug, not bad input
                        raise RuntimeError(f"pipeline delivered layer {staged.layer}, expected {i}")
                    w = staged.weights
                    if i in self._dense:
                        w = {**self._dense[i], **w}
                    if i in self.expert_groups:
                        w = _ExpertLoader(w, self, staged, stats)
                    rec = staged.record
                    stats.bytes_read += rec.bytes
                    stats.read_s += rec.end - rec.start
                    stats.read_intervals.append((rec.start, rec.end))
                    stats.stall_s += stall
                    self.trace.read(i, f"layer_{i:03d}", rec.start, rec.end, rec.bytes, slot=staged.slot)
                    if stall > 1e-4:
                        self.trace.stall(i, t_wait, t_wait + stall)
                if self.kv_host and cache is not None and i + 1 in layers:
                    cache[i + 1].prefetch()  # the next layer's keys and values travel while this one computes
                t0 = time.perf_counter()
                stall0 = stats.stall_s
                x = self.model.layer(i, w, x, cache[i] if cache is not None else None, ctx)
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
                t1 = time.perf_counter()
                t1 -= stats.stall_s - stall0  # on-demand expert reads inside the layer are stall, not compute
                stats.compute_s += t1 - t0
                stats.layer_compute_s[i] = stats.layer_compute_s.get(i, 0.0) + (t1 - t0)
                self.trace.compute(i, t0, t1)
                if collect is not None:
                    collect.append(x.float().cpu())
                if staged is not None:
                    stream.release(staged)
                    stats.copy_s += staged.record.copy_s  # CUDA: the host -> device copy, timed by events
                    if staged.record.copy_s:  # drawn from the read's end: the copy is issued right after it
                        r = staged.record
                        self.trace.copy(i, r.end, r.end + r.copy_s, r.bytes, staged.slot)
        except BaseException:
            # A pass that stops midway leaves the cyclic prefetch out of step: start it afresh.
            self._open_stream()
            raise
        if self.expert_groups:
            stream.whole = self._expect_all_experts(x.shape[0])  # the next step: one new token per row
        return x

    def _nonfinite_error(self) -> LayerRunError:
        """The logits hold NaN/Inf: name the file (layer) whose stored weights do (read again from disk,
        one file at a time: this is the error path), or else call it a numerical overflow."""
        from layerrun.formats.integrity import check_finite

        reader = FileReader(self.path, "pread")
        for entry in [self.manifest.embeddings, *self.manifest.layers, self.manifest.final]:
            w, _ = reader.read(entry)
            try:
                check_finite(self.path / entry.name, w)
            except FormatError as e:
                where = f"layer {entry.layer}" if entry.layer is not None else entry.kind
                return FormatError(f"the model's output became NaN/Inf because of its {where}: {e}")
        return LayerRunError(
            f"the model's output became NaN/Inf although its weights are finite: a numerical overflow computing in "
            f"{str(self.dtype).replace('torch.', '')}; try --compute-dtype float32"
        )

    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Logits (batch, seq, vocab) in float32 for every position; rows may be left-padded."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        self._check_ids(ids)
        if attention_mask is None:
            positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
            key_valid = None
        else:
            key_valid = torch.as_tensor(attention_mask).bool()
            positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
        with self._lock:
            return self._forward(ids, None, positions, key_valid, self._new_stats(ids.shape[1]), last_only=False)

    def hidden_states(self, input_ids) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(hidden states: the embedding output then each layer's output, logits), all float32.

        For locating where an implementation diverges from a reference, layer by layer.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        self._check_ids(ids)
        positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        collect: list[torch.Tensor] = []
        with self._lock:
            logits = self._forward(ids, None, positions, None, self._new_stats(ids.shape[1]), False, collect)
        return collect, logits

    def final_hidden_states(self, input_ids, attention_mask=None) -> torch.Tensor:
        """(batch, seq, hidden) float32: the last layer's output after the final norm, i.e. what the LM
        head reads, for every position (rows may be left-padded, as for :meth:`logits`). Embeddings are
        pooled from these (the server's ``/v1/embeddings``)."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        self._check_ids(ids)
        key_valid = None if attention_mask is None else torch.as_tensor(attention_mask).bool()
        if key_valid is None:
            positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        else:
            positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
        last = _LastOnly()  # every layer's output passes through; only the last one is kept
        with self._lock:  # last_only: the head computes one position, not (seq x vocab) logits
            self._forward(ids, None, positions, key_valid, self._new_stats(ids.shape[1]), last_only=True, collect=last)
        x = last[0].to(self.device, self.dtype)
        return self.model.norm(x, self.final["norm.weight"], self.args.rms_norm_eps).float().cpu()

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.args.vocab_size):
            raise LayerRunError(f"token ids must be in [0, {self.args.vocab_size}); got {ids.min()}..{ids.max()}")

    # ---- per-request figures ------------------------------------------------
    def _new_stats(self, prompt_tokens: int) -> GenerationStats:
        return GenerationStats(
            prompt_tokens=prompt_tokens, mode=self.mode, reader=self.reader_backend, device=str(self.device),
            dtype=str(self.dtype).replace("torch.", ""), notes=list(self.notes), prefetch=self.plan.prefetch,
            threads=self.threads,
            resident_layers=len(self.plan.resident), streamed_layers=len(self.plan.streamed),
            kv_location=self.plan.kv_location,
            plan=list(self.plan.lines),
        )

    def _finish_stats(self, stats: GenerationStats, since: float | None = None) -> None:
        if since is not None:
            # Reads prefetched before this call overlapped earlier work: count only their part inside it.
            stats.read_intervals = [(max(a, since), b) for a, b in stats.read_intervals if b > since]
        stats.peak_rss_bytes = peak_rss_bytes()
        if self.device.type == "cuda":
            stats.peak_vram_bytes = torch.cuda.max_memory_allocated(self.device)
        for note in (self._stream.reader.note if self._stream is not None else None, self.files.note):
            if note and note not in stats.notes:
                stats.notes.append(note)
        stats.direct_io = bool(self._stream is not None and self._stream.reader.backend == "direct")

    @property
    def layers_read(self) -> int:
        """Streamed layers consumed so far (a progress counter: the pipeline's reads, all time)."""
        return len(self._stream.stats.reads) if self._stream is not None else 0

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()
            self._scheduler = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self.reader.close()
        self.files.close()  # leases released: writers no longer wait on this process
        self._resident.clear()
        if self.draft is not None:
            self.draft.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Whole:
    """No stage: every file of the model is this process's."""

    check_model_files = staticmethod(check_model_files)


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


class _LastOnly(list):
    """A ``collect`` list for ``_forward`` that keeps only the latest hidden state."""

    def append(self, x) -> None:
        self[:] = [x]


class _ExpertLoader(dict):
    """A streamed MoE layer's weights before routing: attention, norms and router are here; the
    model calls ``load_experts(ids)`` once it knows which experts the step routes to, and only
    their bytes are read (into the layer's own ring slot)."""

    def __init__(self, weights, engine: Engine, staged, stats: GenerationStats):
        super().__init__(weights)
        self._engine, self._staged, self._stats = engine, staged, stats

    def load_experts(self, ids) -> None:
        eng, st = self._engine, self._stats
        per = eng.expert_groups[self._staged.layer]
        ids = [j for j in ids if j in per]
        names = [n for j in ids for n in per[j]]
        total = eng._expert_bytes[self._staged.layer]
        st.experts_total += len(per)
        if not self._staged.partial:  # staged whole (a step expected to route to nearly every expert)
            st.experts_read += len(per)
            st.expert_bytes_read += total
            return
        t0 = time.perf_counter()
        w, rec = eng._stream.fetch(self._staged, names)
        self.update(w)
        st.expert_bytes_read += rec.bytes
        st.expert_bytes_skipped += total - rec.bytes
        st.experts_read += len(ids)
        st.bytes_read += rec.bytes
        st.read_s += rec.end - rec.start
        st.read_intervals.append((rec.start, rec.end))
        st.stall_s += time.perf_counter() - t0  # compute waits for these reads
        eng.trace.read(self._staged.layer, f"layer_{self._staged.layer:03d} experts {ids}", rec.start, rec.end, rec.bytes,
                       slot=self._staged.slot)


def _trim_heap() -> None:
    """Return freed heap memory to the system (glibc ``malloc_trim``): after the resident weights were
    fused and packed, the intermediate copies' memory otherwise stays in this process's RSS (Gemma 3
    270M bf16: 185 MB). A no-op where glibc is not the allocator."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
