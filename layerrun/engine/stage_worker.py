"""The other ranks' side of a stage (rank > 0): receive a step from the stage before, bring this rank's
KV caches in line with what rank 0's shadows say (:func:`reconcile`), run this rank's layers and send
the hidden states on (the last stage: back to rank 0); answer pings with this stage's figures; stop when
rank 0 says so. Rank 0's side, the messages and the faults are :mod:`layerrun.engine.stages`."""

from __future__ import annotations

import torch

from layerrun.engine.kv_cache import layer_add_rows, layer_drop_prefix, layer_keep_columns, layer_select_rows
from layerrun.engine.stage_parts import (
    PING,
    ROOM,
    STEP,
    STOP,
    _decode_step,
    _encode,
    _prepare,
    _RemoteCache,
    _RowsCache,
    run_layers,
)
from layerrun.engine.telemetry import GenerationStats
from layerrun.errors import LayerRunError


class Worker:
    """One rank > 0 serving steps: its engine (this rank's layers) and a KV cache per cache id rank 0 uses."""

    def __init__(self, stage, engine):
        self.stage, self.engine = stage, engine
        self.caches: dict[int, _RemoteCache] = {}

    def run(self) -> int:
        """Serve steps until rank 0 says stop; a lost neighbour or this rank's own failure ends it with one line."""
        stage = self.stage
        while True:
            try:
                hdr, payload = stage._recv(stage.prev)
            except RuntimeError as e:
                raise stage._worker_lost(stage.prev, e) from None
            kind = int(hdr[0])
            try:
                if kind == STEP:
                    hdr, payload = self._step(hdr, payload)
                elif kind == PING:
                    payload = torch.cat([payload, torch.tensor(stage.stats.row(), dtype=torch.float64).view(torch.uint8)])
                    hdr[13] = payload.numel()
                elif kind == ROOM:
                    payload = stage.answer_room(self.engine, hdr, payload)
                    hdr[13] = payload.numel()
                elif kind != STOP:
                    raise RuntimeError(f"unknown message kind {kind}")
            except Exception as e:  # this rank's own failure: say so where rank 0 can read it, then exit
                msg = str(e) if isinstance(e, LayerRunError) else f"{type(e).__name__}: {e}"
                stage._bye(stage.rank, msg)
                raise LayerRunError(f"{stage.describe(stage.rank)} failed: {msg}") from e
            try:
                if int(hdr[16]) > 1:  # a micro-batch: on to the next stage without waiting, to take the next group
                    stage._send_async(hdr, payload)
                else:
                    stage._flush_sends()
                    stage._send(hdr, payload, stage.next)
            except RuntimeError as e:
                raise stage._worker_lost(stage.next, e) from None
            if kind == STOP:
                return 0

    def _step(self, hdr, payload):
        stage, engine, caches = self.stage, self.engine, self.caches
        T = int(hdr[2])
        mi, m, a = int(hdr[15]), max(int(hdr[16]), 1), int(hdr[17])
        rows, positions, key_valid, freed, x, gather, tree = _decode_step(hdr, payload, engine)
        for cid in freed:
            caches.pop(cid, None)
        cid, L0 = int(hdr[4]), int(hdr[5])
        rc = None
        if cid:
            rc = caches.get(cid)
            if rc is None:
                rc = caches[cid] = _RemoteCache(engine.new_cache())
            if mi == 0:  # a micro-batch's rows: the cache is rearranged once per step, at its first group
                reconcile(stage.layers, rc, rows.tolist(), L0, int(hdr[6]), int(hdr[7]), gather)
        dev = engine.device
        cache = None
        if rc is not None:
            cache = rc.cache if m == 1 else _RowsCache(rc.cache, stage.layers, a, len(rows), L0)
        with torch.inference_mode():
            ctx = _prepare(engine, positions, key_valid, L0 + T, tree)
            x = run_layers(engine, stage.layers, x.to(dev), cache, ctx, GenerationStats(), stage.stats)
        if mi == m - 1:
            stage.stats.steps += 1
            if rc is not None:
                for i in stage.layers:
                    rc.cache.layers[i].length = L0 + T
                rc.width = L0 + T
        last = stage.next == 0
        if last and int(hdr[10]):
            x = x[:, -1:]
        meta = dict(cid=cid, rows=rows, L0=L0, drop=int(hdr[6]), gather_at=int(hdr[7]), gather=gather,
                    col_base=int(hdr[8]))
        micro = (mi, m, a) if m > 1 else None
        if last:  # back to rank 0: the hidden states only
            return _encode(STEP, x, None, None, None, False, [], micro)
        return _encode(STEP, x, meta, positions, key_valid, bool(hdr[10]), freed, micro, tree)


def reconcile(layers: range, rc: _RemoteCache, rows: list[int], L0: int, drop: int, gather_at: int, gather) -> None:
    """Rearrange this rank's cache to hold the rows and columns rank 0's shadow says (see
:mod:`layerrun.engine.stages`): keep
    and add rows by id, drop ``drop`` leading columns, then gather each row's columns from ``gather_at`` on
    (what the lane did after verifying a token tree); ``L0`` columns remain."""
    where = {r: i for i, r in enumerate(rc.rows)}
    keep = [where[r] for r in rows if r in where]
    new = [r for r in rows if r not in where]
    if rows != [rc.rows[i] for i in keep] + new:
        raise RuntimeError("stage cache out of step: joining rows are not at the end")
    own = [rc.cache.layers[i] for i in layers]
    if len(keep) != len(rc.rows):
        idx = torch.tensor(keep, dtype=torch.long)
        for layer in own:
            layer_select_rows(layer, idx)
    if new:
        for layer in own:
            layer_add_rows(layer, len(new))
    rc.rows = list(rows)
    left = rc.width - drop
    if L0 == 0:
        drop, left = rc.width, 0
    if drop < 0 or left < L0 or (gather_at < 0 and left != L0):
        raise RuntimeError(f"stage cache out of step: {rc.width} columns held, rank 0 expects {L0} after "
                           f"dropping {drop}")
    if drop:
        for layer in own:
            if left == 0:
                layer.k, layer.v, layer.length = None, None, 0
            else:
                layer_drop_prefix(layer, drop)
    if gather_at >= 0 and L0:
        if gather is None or gather.shape != (len(rows), L0 - gather_at) or (
                gather.numel() and not 0 <= int(gather.min()) <= int(gather.max()) < left - gather_at):
            raise RuntimeError("stage cache out of step: a column gather that does not fit the cache")
        for layer in own:
            layer_keep_columns(layer, gather_at, gather)
    rc.width = L0
