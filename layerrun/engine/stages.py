"""One rank's stage: its layers, and the step's data path rank to rank over torch.distributed.

This module is rank 0's side (it drives every step and keeps the shadows), the messages and the faults;
the other ranks' loop is :mod:`layerrun.engine.stage_worker`, the pieces both use
:mod:`layerrun.engine.stage_parts`.

A step goes around a ring: rank 0 embeds the batch and runs its own layers, sends the hidden
states with the step's metadata to rank 1, which runs its layers and sends them on; the last rank
sends the final hidden states back to rank 0, which runs the head and samples. Each rank keeps the
KV cache of its own layers.

The metadata (positions, the key mask, which rows are live) is what rank 0's batch generator
decided. Rows join, leave and get compacted on rank 0 by the same calls as in one process; rank 0
keeps a tiny shadow in place of each remote layer's cache (one int64 per row and column: the row's
id in ``k``, the column's serial number in ``v``) that those calls rearrange exactly like a real
one. From a shadow, every step tells the other ranks which rows it holds (by id; new rows at the
end) and how to get from the columns they hold (the shadow's as the last step left it) to the
shadow's now: leading columns to drop, and after a verified token tree (speculative decoding: only
each row's accepted columns stay) a per-row gather from the first column that changed. A token
tree's mask goes with the step to every stage; rank 0 picks the tokens whose logits it needs
(``select``) before the head.

The head runs on rank 0, next to the embeddings: most small and mid-sized models tie the head to the
embedding matrix, which rank 0 holds anyway, and the last stage sends back ``hidden_size`` numbers
per row instead of ``vocab_size`` logits (10-50x less).

Faults: every receive waits at most ``timeout`` seconds (rank 0 pings the ring every few seconds when
idle, so an idle rank hears something); a lost connection or a timeout ends the stage with one line
naming the rank that went, which each rank that notices also leaves in the rendezvous store so rank 0
can name the culprit rather than its neighbour.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time
from collections import deque

import torch

from layerrun.engine.kv_cache import KVCache
from layerrun.engine.stage_memory import StageMemory
from layerrun.engine.stage_parts import (
    HEADER,
    MAX_PAYLOAD,
    N_STATS,
    PING,
    STEP,
    STOP,
    StageStats,
    _columns,
    _decode_hidden,
    _encode,
    _groups,
    _OnlyFiles,
    _prepare,
    _RowsCache,
    _Shadow,
    _StageArgs,
    _StageManifest,
    run_layers,
)
from layerrun.engine.telemetry import GenerationStats
from layerrun.errors import LayerRunError

BYE_KEY = "layerrun/bye/{}"
FAILED_KEY = "layerrun/failed"


class StageLost(LayerRunError):
    """A stage (rank) is gone: the pipeline cannot run any more."""


class Stage(StageMemory):
    """This rank's place in the pipeline: ``layers`` (a range), and the send/recv to its neighbours; the
    memory for its sequences is :class:`~layerrun.engine.stage_memory.StageMemory`'s."""

    def __init__(self, rank: int, world: int, ranges: list[range], timeout: float, lines: list[str]):
        self.rank, self.world, self.ranges, self.timeout = rank, world, ranges, float(timeout)
        self.layers = ranges[rank]
        self.lines = list(lines)
        self.failure: str | None = None
        self.stats = StageStats(rank, self.layers.start, self.layers.stop - 1)
        self.stage_stats: list[StageStats] = []  # rank 0: every stage's figures at the last ping
        self.ping_s = max(0.5, min(10.0, self.timeout / 4))
        self._lock = threading.Lock()
        self._row_ids = itertools.count(1)
        self._col_serial = 1
        self._cache_ids = itertools.count(1)
        self._freed: deque[int] = deque()
        self._pending: deque = deque()  # micro-batch sends still in flight (the tensors must live until done)
        self.micro = 0  # rank 0: micro-batches per step (0: none), decided at attach
        self.deep_ring = False  # --prefetch not given: a streaming stage's ring covers its range (plan_memory)
        self.host_share: int | None = None  # ranks sharing a host: this one's part of the free memory it measured
        self._last_traffic = time.monotonic()
        self._last_ping = 0.0  # the first ping goes out at once: every stage's figures exist from the start
        self._pinger: threading.Thread | None = None
        self._closed = threading.Event()
        self._attached = False

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world

    def describe(self, r: int) -> str:
        rng = self.ranges[r]
        return f"stage {r} (rank {r}, layers {rng.start}-{rng.stop - 1})"

    # ---- the engine's hooks ------------------------------------------------------------------------
    def check_model_files(self, folder, manifest, model) -> None:
        """As :func:`~layerrun.engine.model_files.check_model_files`, for this rank's files only."""
        import os

        from layerrun.engine.model_files import check_model_files
        from layerrun.io.reader import check_size, open_layer_file

        if self.rank == 0:
            files = [*(manifest.layer(i) for i in self.layers), manifest.embeddings, manifest.final]
        else:
            files = [manifest.layer(i) for i in self.layers]
        check_model_files(folder, _OnlyFiles(manifest, []), model)  # the tensors against config.json: all of them
        for entry in files:
            fd, st = open_layer_file(folder, entry)
            os.close(fd)
            check_size(folder, entry, st.st_size)

    def plan_memory(self, manifest, args, deepen: bool = True, **kw):
        """The governor's plan over this rank's layers (its own --max-memory, --mode, --prefetch).

        Without --prefetch (``deep_ring``), a stage that streams every layer of its range gets a ring as
        deep as the range, as far as its budget allows: in a pipeline a rank's disk would otherwise idle
        while the other stages compute (with a ring of R slots, a stage of S layers reads only R of its
        next token's layers ahead, the other S - R when its turn comes; bench/RESULTS.md). A plan that
        keeps layers resident stays as it is: a resident layer saves its read every token, a ring slot
        only moves it earlier, for the same memory."""
        from layerrun.engine.governor import fmt, plan_memory

        local = list(self.layers)
        view = _StageManifest(manifest, self.layers, self.rank == 0, local_index=True)
        plan = plan_memory(view, _StageArgs(args, len(local)), **kw)
        if deepen and self.deep_ring and plan.mode == "stream" and len(local) - 1 > plan.prefetch:
            asked = plan.prefetch
            for depth in range(len(local) - 1, asked, -1):
                deep = plan_memory(view, _StageArgs(args, len(local)), **{**kw, "prefetch": depth})
                # ranks on one host each measured the same free memory: a deepened ring takes only its share
                if deep.prefetch > asked and (self.host_share is None or deep.need <= self.host_share):
                    plan = deep
                    break
            if plan.prefetch > asked:
                share = "" if self.host_share is None else f", within this rank's share of its host's free memory " \
                                                           f"({fmt(self.host_share)})"
                plan.lines.append(f"prefetch {plan.prefetch} (not {asked}): this stage streams, so its ring reads its "
                                  f"next token's layers while the other stages compute{share} (--prefetch sets it; a "
                                  f"longer KV cache makes it shallower)")
        plan.resident = [local[i] for i in plan.resident]
        plan.streamed = [local[i] for i in plan.streamed]
        plan.dense_resident = [local[i] for i in plan.dense_resident]
        plan.lines.insert(0, f"{self.describe(self.rank)}: this rank's governor")
        return plan

    def attach(self, engine) -> None:
        """Every rank, once its engine is loaded: share the plans (rank 0's --explain shows them all) and
        learn whether every rank loaded. Rank 0 then starts pinging the ring."""
        self._exchange(("ok", engine.plan.lines, bool(engine.plan.streamed) or engine.kv_host, self.own_rooms(engine)))
        if self.rank == 0:
            # Micro-batches pay when no stage streams: a streamed stage would read its layers once per group.
            self.micro = 0 if any(self._streams) else self.world
            own = len(engine.plan.lines)
            engine.plan.lines = self.lines + [ln for lines in self._plans for ln in lines]
            engine.explain_lines = engine.plan.lines + engine.explain_lines[own:]  # --explain: the split, every plan
            self._pinger = threading.Thread(target=self._ping_loop, name="layerrun-stage-ping", daemon=True)
            self._pinger.start()

    def abort(self, message: str) -> None:
        """This rank failed before :meth:`attach`: tell the others (they are waiting in it)."""
        if not self._attached:
            try:
                self._exchange(("error", message, False, (0, 0)))
            except LayerRunError:
                pass

    def _exchange(self, mine) -> None:
        import torch.distributed as dist

        got: list = [None] * self.world
        try:
            dist.all_gather_object(got, mine)
        except RuntimeError as e:
            raise LayerRunError(f"{self.describe(self.rank)}: another rank went away while loading ({_why(e, self.timeout)})") from None
        self._attached = True
        for r, (status, payload, _, _) in enumerate(got):
            if status != "ok" and r != self.rank:
                raise LayerRunError(f"rank {r} failed to start: {payload}")
        self._plans = [payload for _, payload, _, _ in got]
        self._streams = [streams for _, _, streams, _ in got]
        self.rooms = [tuple(rooms) for _, _, _, rooms in got]

    def new_cache(self, engine) -> KVCache:
        """Rank 0: real caches for its layers, shadows for the others'; the other ranks learn of a new
        cache by its id, and of a freed one at the next step."""
        import weakref

        cache = KVCache(engine.args.num_hidden_layers, host_device=engine.device if engine.kv_host else None)
        if self.rank == 0:
            for i in range(len(cache.layers)):
                if i not in self.layers:
                    cache.layers[i] = _Shadow()
            cache._stage_id = next(self._cache_ids)
            weakref.finalize(cache, self._freed.append, cache._stage_id)
        return cache

    # ---- rank 0: one step around the ring ---------------------------------------------------------
    def forward(self, engine, ids, cache, positions, key_valid, stats: GenerationStats, last_only: bool, collect,
                tree=None, select=None):
        """``Engine._forward`` under torchrun. ``tree`` (a token tree's mask) goes to every stage with the step;
        ``select`` (flat indices of the tokens whose logits are wanted) applies here, before the head."""
        from layerrun.engine.engine import _LastOnly

        if collect is not None and not isinstance(collect, _LastOnly):
            raise LayerRunError("the hidden states of every layer are not gathered across stages; run this in one "
                                "process (without torchrun)")
        with self._lock, torch.inference_mode():
            self.check()
            step_t0 = time.perf_counter()
            past = cache.length if cache is not None else 0
            B, T = ids.shape
            if self.micro and cache is not None and collect is None and B > 1:
                x = self._forward_micro(engine, ids, cache, positions, key_valid, stats, last_only, past, tree)
                return self._head(engine, x, stats, step_t0, select)
            x = engine._embed(ids.to(engine.device))
            if len(self.layers):
                ctx = _prepare(engine, positions, key_valid, past + T, tree)
                x = run_layers(engine, self.layers, x, cache, ctx, stats, self.stats)
            meta = self._cache_meta(cache, B, T)
            hdr, payload = _encode(STEP, x, meta, positions, key_valid, last_only and collect is None,
                                   [self._freed.popleft() for _ in range(len(self._freed))], tree=tree)
            hdr, payload = self._round_trip(hdr, payload)
            x = _decode_hidden(hdr, payload, engine).to(engine.device)
            if cache is not None:
                self._advance_shadows(cache, meta, T)
            if collect is not None:
                collect.append(x.float().cpu())
            if last_only and select is None:
                x = x[:, -1:]
            return self._head(engine, x, stats, step_t0, select)

    def _head(self, engine, x, stats: GenerationStats, step_t0: float, select=None) -> torch.Tensor:
        t0 = time.perf_counter()
        if select is not None:  # as Engine._forward: the logits (N, V) of those tokens only
            x = x.reshape(-1, x.shape[-1])[select.to(x.device)][None]
        out = engine.model.head(engine.final, x, engine.embeddings).float()
        if not torch.isfinite(out).all():
            raise LayerRunError("the model's output became NaN/Inf; check each host's files with `layerrun validate` "
                                "(or compute in float32: --compute-dtype float32)")
        stats.compute_s += time.perf_counter() - t0
        stats.steps += 1
        stats.step_s += time.perf_counter() - step_t0
        self.stats.steps += 1
        return out[0] if select is not None else out

    def _forward_micro(self, engine, ids, cache, positions, key_valid, stats, last_only: bool, past: int, tree=None):
        """The batch's rows in ``micro`` groups that follow each other through the stages: rank 0 computes
        group 2 while rank 1 computes group 1, and so on. Only when every stage holds its layers resident
        (a streamed stage would read its layers once per group)."""
        import torch.distributed as dist

        B, T = ids.shape
        groups = _groups(B, min(B, self.micro))
        meta = self._cache_meta(cache, B, T)
        freed = [self._freed.popleft() for _ in range(len(self._freed))]
        dev = engine.device
        sent = []
        for i, (a, b) in enumerate(groups):
            x = engine._embed(ids[a:b].to(dev))
            kv = key_valid[a:b] if key_valid is not None else None
            tr = tree[a:b] if tree is not None else None
            if len(self.layers):
                ctx = _prepare(engine, positions[a:b], kv, past + T, tr)
                x = run_layers(engine, self.layers, x, _RowsCache(cache, self.layers, a, B, past), ctx, stats, self.stats)
            hdr, payload = _encode(STEP, x, meta, positions[a:b], kv, last_only, freed if i == 0 else [],
                                   micro=(i, len(groups), a), tree=tr)
            t0 = time.perf_counter()
            try:
                sent.append((dist.isend(hdr, self.next), dist.isend(payload, self.next), hdr, payload))
            except RuntimeError as e:
                raise self._lost(self.next, e) from None
            self.stats.send_s += time.perf_counter() - t0
        for i in self.layers:
            cache.layers[i].length = past + T
        xs = []
        try:
            for _ in groups:
                hdr, payload = self._recv(self.prev)
                xs.append(_decode_hidden(hdr, payload, engine).to(dev))
            for w1, w2, _, _ in sent:
                w1.wait(datetime.timedelta(seconds=self.timeout))
                w2.wait(datetime.timedelta(seconds=self.timeout))
        except RuntimeError as e:
            raise self._lost(self.prev, e) from None
        self._advance_shadows(cache, meta, T)
        x = torch.cat(xs)
        return x[:, -1:] if last_only else x

    def _cache_meta(self, cache, B: int, T: int) -> dict:
        """Which rows (ids; 0 = not cached anywhere yet: given a new id) the step's cache holds, and how the
        other ranks turn the columns they hold into the ones the shadow holds now (see :func:`_columns`)."""
        meta = dict(cid=0, rows=torch.zeros(B, dtype=torch.long), L0=0, drop=0, gather_at=-1, gather=None,
                    col_base=self._col_serial)
        self._col_serial += T
        if cache is None:
            return meta
        s = cache.layers[self.ranges[1].start]
        meta["cid"], meta["L0"] = cache._stage_id, s.length
        prev_rows, held = getattr(cache, "_stage_held", ([], torch.zeros((0, 0), dtype=torch.long)))
        if s.k is not None and s.length:
            if s.k.shape[0] != B:
                raise RuntimeError(f"stage shadow cache has {s.k.shape[0]} rows, the step {B}")
            meta["rows"] = s.k[:, 0, : s.length, 0].amax(1).clone()
        rows = meta["rows"]
        old = int((rows != 0).sum())
        if bool((rows[:old] == 0).any()):
            raise RuntimeError("stage shadow cache: joining rows are not at the end")
        if s.length == 0 or old == 0:
            meta["drop"] = held.shape[1] - s.length
        else:
            where = {r: i for i, r in enumerate(prev_rows)}
            try:
                sel = torch.tensor([where[r] for r in rows[:old].tolist()], dtype=torch.long)
            except KeyError:
                raise RuntimeError("stage shadow cache: a row the other ranks never saw") from None
            meta["drop"], meta["gather_at"], gather = _columns(held.index_select(0, sel), s.v[:old, 0, : s.length, 0])
            if gather is not None:
                meta["gather"] = torch.cat([gather, gather.new_zeros((B - old, gather.shape[1]))])
        if meta["drop"] < 0:
            raise RuntimeError(f"stage shadow cache has {s.length} columns, the other ranks {held.shape[1]}")
        for b in range(B):
            if rows[b] == 0:
                rows[b] = next(self._row_ids)
        return meta

    def _advance_shadows(self, cache, meta: dict, T: int) -> None:
        B = len(meta["rows"])
        k = meta["rows"].view(B, 1, 1, 1).expand(B, 1, T, 1)
        v = torch.arange(meta["col_base"], meta["col_base"] + T).view(1, 1, T, 1).expand(B, 1, T, 1)
        for layer in cache.layers:
            if isinstance(layer, _Shadow):
                layer.update(k, v)
        s = cache.layers[self.ranges[1].start]
        # what the other ranks hold now: the next step tells them how to get from this to the shadow then
        cache._stage_held = (meta["rows"].tolist(), s.v[:, 0, : s.length, 0].clone())

    def check(self) -> None:
        if self.failure:
            raise StageLost(self.failure)

    # ---- the other ranks: serve steps until rank 0 says stop (:mod:`layerrun.engine.stage_worker`) --
    def serve(self, engine) -> int:
        from layerrun.engine.stage_worker import Worker

        return Worker(self, engine).run()

    # ---- messages ---------------------------------------------------------------------------------
    def _send(self, hdr: torch.Tensor, payload: torch.Tensor, dst: int) -> None:
        import torch.distributed as dist

        t0 = time.perf_counter()
        dist.send(hdr, dst)
        if payload.numel():
            dist.send(payload, dst)
        self.stats.send_s += time.perf_counter() - t0
        self._last_traffic = time.monotonic()

    def _round_trip(self, hdr: torch.Tensor, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank 0: send a message into the ring and receive what comes back round from the last stage; a
        failure either way names the rank that went (:meth:`_lost`)."""
        try:
            self._send(hdr, payload, self.next)
        except RuntimeError as e:
            raise self._lost(self.next, e) from None
        try:
            return self._recv(self.prev)
        except RuntimeError as e:
            raise self._lost(self.prev, e) from None

    def _send_async(self, hdr: torch.Tensor, payload: torch.Tensor) -> None:
        import torch.distributed as dist

        t0 = time.perf_counter()
        works = [dist.isend(hdr, self.next)] + ([dist.isend(payload, self.next)] if payload.numel() else [])
        self._pending.append((works, hdr, payload))
        self.stats.send_s += time.perf_counter() - t0
        self._last_traffic = time.monotonic()
        if len(self._pending) > 64:
            self._flush_sends()

    def _flush_sends(self) -> None:
        wait = datetime.timedelta(seconds=self.timeout)
        while self._pending:
            works, _, _ = self._pending.popleft()
            for w in works:
                w.wait(wait)

    def _recv(self, src: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.distributed as dist

        t0 = time.perf_counter()
        wait = datetime.timedelta(seconds=self.timeout)
        hdr = torch.empty(HEADER, dtype=torch.long)
        dist.irecv(hdr, src).wait(wait)
        n = int(hdr[13])
        if not 0 <= n <= MAX_PAYLOAD:
            raise RuntimeError(f"a message from rank {src} announces {n} bytes")
        payload = torch.empty(n, dtype=torch.uint8)
        if n:
            dist.irecv(payload, src).wait(wait)
        self.stats.wait_s += time.perf_counter() - t0
        self._last_traffic = time.monotonic()
        return hdr, payload

    # ---- rank 0: pings, stats, close --------------------------------------------------------------
    def _ping_loop(self) -> None:
        while not self._closed.wait(self.ping_s / 2):
            if self.failure:
                return
            if time.monotonic() - self._last_ping < self.ping_s or not self._lock.acquire(blocking=False):
                continue
            try:
                self._ping()
            except StageLost:
                return
            finally:
                self._lock.release()

    def _ping(self) -> None:
        self._last_ping = time.monotonic()
        hdr = torch.zeros(HEADER, dtype=torch.long)
        hdr[0] = PING
        hdr, payload = self._round_trip(hdr, torch.empty(0, dtype=torch.uint8))
        rows = payload.view(torch.float64).view(-1, N_STATS).tolist() if payload.numel() else []
        self.stage_stats = [self.stats, *[StageStats.from_row(r) for r in rows]]

    def collect_stats(self) -> list[StageStats]:
        """Rank 0: every stage's figures now (a ping around the ring)."""
        with self._lock:
            if not self.failure:
                try:
                    self._ping()
                except StageLost:
                    pass
        return self.stage_stats or [self.stats]

    def prometheus(self) -> str:
        """Rank 0: every stage's figures (at the last ping) in Prometheus' text format."""
        out = []
        names = [("bytes_read", "bytes of layers read from disk"), ("read_s", "seconds reads were busy"),
                 ("stall_s", "seconds compute waited for reads"), ("compute_s", "seconds computing layers"),
                 ("send_s", "seconds sending to the next stage"), ("wait_s", "seconds waiting for the stage before"),
                 ("steps", "forward steps")]
        stages = self.stage_stats or [self.stats]
        for name, help in names:
            metric = f"layerrun_stage_{name}_total"
            out += [f"# HELP {metric} Per pipeline stage (torchrun): {help}.", f"# TYPE {metric} counter"]
            out += [f'{metric}{{stage="{s.rank}",layers="{s.first}-{s.last}"}} {float(getattr(s, name))}' for s in stages]
        up = "layerrun_stages_up"
        out += [f"# HELP {up} 1 while every pipeline stage answers, 0 once one is gone.", f"# TYPE {up} gauge",
                f"{up} {0 if self.failure else 1}"]
        return "\n".join(out) + "\n"

    def close(self) -> None:
        """Rank 0: tell every rank to stop (they exit), then leave the group."""
        import torch.distributed as dist

        self._closed.set()
        if self.rank == 0 and self._attached and not self.failure:
            with self._lock:
                hdr = torch.zeros(HEADER, dtype=torch.long)
                hdr[0] = STOP
                try:
                    self._send(hdr, torch.empty(0, dtype=torch.uint8), self.next)
                    self._recv(self.prev)
                except RuntimeError:
                    pass
        if self._pinger is not None:
            self._pinger.join(timeout=self.timeout)
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except RuntimeError:
            pass

    # ---- faults -----------------------------------------------------------------------------------
    def _store(self):
        import torch.distributed as dist

        try:
            return dist.distributed_c10d._get_default_store()
        except (RuntimeError, ValueError, AttributeError):
            return None

    def _in_thread(self, fn, wait: float = 3.0):
        """Run a store call that must not hang this rank's exit (the store may live on a dead host)."""
        out: list = []

        def run():
            try:
                out.append(fn())
            except Exception:  # noqa: BLE001 - a dead store: nothing to learn from it
                pass

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(wait)
        return out[0] if out else None

    def _bye(self, culprit: int, reason: str) -> None:
        store = self._store()
        if store is not None:
            self._in_thread(lambda: store.set(BYE_KEY.format(self.rank), f"{culprit}|{reason}"))

    def _lost(self, peer: int, e: Exception) -> StageLost:
        """Rank 0: a send or receive failed. Name the rank that went: one that said it failed itself, or
        one that its neighbours lost and that said nothing, else the peer this rank lost."""
        store = self._store()
        byes: dict[int, tuple[int, str]] = {}
        deadline = time.monotonic() + min(5.0, self.timeout)
        culprit, reason = peer, _why(e, self.timeout)
        while store is not None:
            for r in range(1, self.world):
                key = BYE_KEY.format(r)
                if r not in byes and self._in_thread(lambda key=key: store.check([key]), 1.0):
                    raw = self._in_thread(lambda key=key: store.get(key).decode(), 1.0) or "0|"
                    c, _, why = raw.partition("|")
                    byes[r] = (int(c), why)
            own = [r for r, (c, _) in byes.items() if c == r]
            named = sorted({c for c, _ in byes.values() if c not in byes and c != 0})
            if own:
                culprit, reason = own[0], byes[own[0]][1]
                break
            if named:
                culprit, reason = named[0], "exited or stopped answering"
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if culprit == 0:
            culprit = peer
        self.failure = f"{self.describe(culprit)} is gone: {reason}"
        if store is not None:
            self._in_thread(lambda: store.set(FAILED_KEY, self.failure))
        return StageLost(self.failure)

    def _worker_lost(self, peer: int, e: Exception) -> LayerRunError:
        self._bye(peer, _why(e, self.timeout))
        store = self._store()
        said = None
        if store is not None and self._in_thread(lambda: store.check([FAILED_KEY]), 1.0):
            said = self._in_thread(lambda: store.get(FAILED_KEY).decode(), 1.0)
        what = f"rank 0 reported: {said}" if said else f"lost {self.describe(peer)}: {_why(e, self.timeout)}"
        return LayerRunError(f"{self.describe(self.rank)} stopping: {what}")


def _why(e: Exception, timeout: float) -> str:
    s = str(e)
    if "Timed out" in s or "timed out" in s or "Timeout" in s:
        return f"no answer for {timeout:.0f} s (--stage-timeout)"
    if "closed" in s.lower() or "reset" in s.lower() or "broken pipe" in s.lower():
        return "connection closed (the process exited or its host went down)"
    return s.splitlines()[0][:200] if s else type(e).__name__
