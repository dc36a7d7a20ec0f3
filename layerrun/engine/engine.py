"""The engine: loads a layered model and runs its forward pass, streaming layers from disk.

:class:`Engine` owns the weights (resident or streamed through the pipeline), the memory plan
and the forward pass (``_forward``: one pass of every layer over a block of new tokens, with
an optional KV cache). ``Engine.logits`` runs a plain forward pass for validation. Generation
(``stream``, ``generate``, batches) lives in :mod:`layerrun.engine.generation`, mixed in here,
and drives the one generation loop in :mod:`layerrun.engine.batch`; preparing weights is in
:mod:`layerrun.engine.weights`, memory for sequences (room, make_room) in
:mod:`layerrun.engine.engine_memory`, both mixed in too.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from layerrun.engine.draft import open_draft
from layerrun.engine.engine_memory import EngineMemory
from layerrun.engine.generation import BATCH_FIELDS, DEFAULT_MAX_NEW_TOKENS, Chunk, Generation, GenerationAPI
from layerrun.engine.kv_cache import KVCache
from layerrun.engine.model_files import check_model_files, load_config
from layerrun.engine.speculative import Speculator
from layerrun.engine.telemetry import GenerationStats, peak_rss_bytes
from layerrun.engine.threads import apply_threads
from layerrun.engine.tokenizer import Tokenizer
from layerrun.engine.trace import TraceRecorder
from layerrun.engine.weights import EngineWeights, _LoadProgress, _trim_heap
from layerrun.errors import FormatError, LayerRunError
from layerrun.formats.convert import DTYPES
from layerrun.formats.integrity import Verifier
from layerrun.formats.manifest import Manifest
from layerrun.io.guard import ModelFiles
from layerrun.io.pipeline import LayerStream
from layerrun.io.reader import FileReader
from layerrun.models.base import expert_index
from layerrun.models.fast import streams_fast

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


class Engine(GenerationAPI, EngineMemory, EngineWeights):
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

