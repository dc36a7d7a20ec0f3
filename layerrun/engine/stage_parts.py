"""The pieces of a pipeline stage (:mod:`layerrun.engine.stages`): its figures, the cache views
micro-batches and rank 0's shadows use, the wire format of a step, the loop over a stage's layers and
its per-step context, how the other ranks' caches follow rank 0's shadows (:func:`_columns`), and the
views of the manifest that the governor and the file check see for one stage."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from layerrun.engine.kv_cache import KVCache, LayerKV
from layerrun.engine.telemetry import GenerationStats

HEADER = 20
WIRE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MAX_PAYLOAD = 16 * 2**30
STEP, PING, STOP, ROOM = 1, 2, 3, 4  # ROOM: make room for a longer KV cache (stage_memory)

@dataclass
class StageStats:
    """One stage's figures since start (``--stats``, the server's metrics)."""

    rank: int = 0
    first: int = 0
    last: int = 0
    bytes_read: int = 0
    read_s: float = 0.0
    stall_s: float = 0.0
    compute_s: float = 0.0
    send_s: float = 0.0
    wait_s: float = 0.0  # receiving: waiting for the stage before (idle time included)
    steps: int = 0

    def row(self) -> list[float]:
        return [float(getattr(self, f.name)) for f in fields(self)]

    @classmethod
    def from_row(cls, row: list[float]) -> StageStats:
        kw = {f.name: (int(v) if f.type in ("int", int) else float(v)) for f, v in zip(fields(cls), row)}
        return cls(**kw)


N_STATS = len(fields(StageStats))


def _groups(B: int, m: int) -> list[tuple[int, int]]:
    """``m`` contiguous row groups of a batch of ``B`` (sizes differ by at most one)."""
    cuts = [B * k // m for k in range(m + 1)]
    return [(cuts[k], cuts[k + 1]) for k in range(m) if cuts[k + 1] > cuts[k]]


class _RowsCache:
    """A micro-batch's view of a cache: rows [a, a+b) of each of ``layers``' caches, appending its new
    entries in place at column ``base``; the layers' lengths advance once every group of the step ran."""

    def __init__(self, cache: KVCache, layers: range, a: int, rows: int, base: int):
        self.cache, self.layers, self.a, self.rows, self.base = cache, layers, a, rows, base

    def __getitem__(self, i: int):
        return _RowsKV(self.cache.layers[i], self.a, self.rows, self.base)


class _RowsKV:
    def __init__(self, layer: LayerKV, a: int, rows: int, base: int):
        self.layer, self.a, self.rows, self.base = layer, a, rows, base

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lay, a, L = self.layer, self.a, self.base
        b, need = a + k.shape[0], L + k.shape[2]
        if lay.k is None or need > lay.k.shape[2] or lay.k.dtype != k.dtype:
            lay._grow(k.new_empty((self.rows, *k.shape[1:])), need)  # keeps the first ``length`` (= L) columns
        lay.k[a:b, :, L:need] = k
        lay.v[a:b, :, L:need] = v
        return lay.k[a:b, :, :need], lay.v[a:b, :, :need]


class _Shadow(LayerKV):
    """Rank 0's stand-in for a layer another rank computes (see the module's docstring)."""


@dataclass
class _RemoteCache:
    cache: KVCache
    rows: list[int] = field(default_factory=list)
    width: int = 0  # columns held (as rank 0's shadow had them after the last step)


# ---- the wire format ------------------------------------------------------------------------------
# header (int64 x 20): kind, B, T, H, cache id, cached columns L0, leading columns to drop, column gather start
# (-1: none), first new column's serial, key-mask width S, last_only, mask is bool, freed caches, payload bytes,
# dtype, micro-batch index, micro-batches, its first row, the whole batch's rows R, token-tree width (0: none)
# payload (bytes): row ids (R int64), positions (B*T int64), freed cache ids, column gather (R*(L0-start) int64),
# hidden states, key positions or mask (B*S int64), token-tree mask (B*T*W bool)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _encode(kind: int, x: torch.Tensor, meta: dict | None, positions, key_valid, last_only: bool, freed: list[int],
            micro: tuple[int, int, int] | None = None, tree: torch.Tensor | None = None):
    hdr = torch.zeros(HEADER, dtype=torch.long)
    B, T, H = x.shape
    parts, tail = [], []
    hdr[0], hdr[1], hdr[2], hdr[3] = kind, B, T, H
    if micro is not None:
        hdr[15], hdr[16], hdr[17] = micro
    if meta is not None:  # 8-byte fields around the hidden states: every view stays aligned
        hdr[4], hdr[5], hdr[6], hdr[7], hdr[8] = (meta["cid"], meta["L0"], meta["drop"], meta["gather_at"],
                                                  meta["col_base"])
        hdr[18] = len(meta["rows"])  # the whole batch's rows (a micro-batch's x holds B of them, from hdr[17])
        parts += [_bytes(meta["rows"].to(torch.long)), _bytes(positions.cpu().to(torch.long))]
        hdr[12] = len(freed)
        if freed:
            parts.append(_bytes(torch.tensor(freed, dtype=torch.long)))
        if meta["gather_at"] >= 0 and meta["gather"].numel():
            parts.append(_bytes(meta["gather"].to(torch.long)))
        if key_valid is not None:
            hdr[9] = key_valid.shape[1]
            hdr[11] = int(key_valid.dtype == torch.bool)  # a mask, or key positions (-1 = padding)
            tail.append(_bytes(key_valid.cpu().to(torch.long)))
        if tree is not None:  # a token tree (speculative verification): every stage builds the same mask
            hdr[19] = tree.shape[2]
            tail.append(_bytes(tree.cpu().to(torch.bool)))
    hdr[10] = int(last_only)
    hdr[14] = WIRE_DTYPES.index(x.dtype)
    parts.append(_bytes(x.detach().cpu()))
    parts += tail
    payload = torch.cat(parts) if len(parts) > 1 else parts[0]
    hdr[13] = payload.numel()
    return hdr, payload


def _hidden(buf: torch.Tensor, hdr, engine, B: int, T: int) -> torch.Tensor:
    H = int(hdr[3])
    dtype = WIRE_DTYPES[int(hdr[14])] if 0 <= int(hdr[14]) < len(WIRE_DTYPES) else None
    if H != engine.args.hidden_size or dtype is None or buf.numel() != B * T * H * dtype.itemsize:
        raise RuntimeError(f"hidden states of the wrong shape arrived: ({B}, {T}, {H}) {dtype}")
    return buf.view(dtype).view(B, T, H).to(engine.dtype)


def _decode_hidden(hdr, payload, engine) -> torch.Tensor:
    return _hidden(payload, hdr, engine, int(hdr[1]), int(hdr[2]))


def _decode_step(hdr, payload, engine):
    B, T, S, nfreed, R, W = int(hdr[1]), int(hdr[2]), int(hdr[9]), int(hdr[12]), int(hdr[18]), int(hdr[19])
    L0, at = int(hdr[5]), int(hdr[7])
    G = L0 - at if at >= 0 else 0
    if min(B, T, S, nfreed, R, W, L0, G) < 0 or at > L0:
        raise RuntimeError("a step message with negative sizes")
    o = 0

    def take(n: int) -> torch.Tensor:
        nonlocal o
        if o + n > payload.numel():
            raise RuntimeError("a step message shorter than its header says")
        out = payload[o : o + n]
        o += n
        return out

    rows = take(8 * R).view(torch.long).clone()
    positions = take(8 * B * T).view(torch.long).view(B, T).clone()
    freed = take(8 * nfreed).view(torch.long).tolist() if nfreed else []
    gather = take(8 * R * G).view(torch.long).view(R, G).clone() if at >= 0 else None
    end = payload.numel() - 8 * B * S - B * T * W
    if end < o:
        raise RuntimeError("a step message shorter than its header says")
    x = _hidden(payload[o:end], hdr, engine, B, T)
    o = end
    key_valid = take(8 * B * S).view(torch.long).view(B, S).clone() if S else None
    if key_valid is not None and int(hdr[11]):
        key_valid = key_valid.bool()
    tree = take(B * T * W).view(torch.bool).view(B, T, W).clone() if W else None
    return rows, positions, key_valid, freed, x, gather, tree


# ---- this rank's layers -----------------------------------------------------------------------------
def run_layers(engine, layers: range, x, cache, ctx, stats: GenerationStats, sstats: StageStats):
    """Run ``layers`` of ``engine`` on ``x`` (``Engine._run_layers``, the loop of a single process's pass),
    adding what they read, stalled and computed to the stage's own figures."""
    b0, r0, s0, c0 = stats.bytes_read, stats.read_s, stats.stall_s, stats.compute_s
    x = engine._run_layers(layers, x, cache, ctx, stats)
    sstats.bytes_read += stats.bytes_read - b0
    sstats.read_s += stats.read_s - r0
    sstats.stall_s += stats.stall_s - s0
    sstats.compute_s += stats.compute_s - c0
    return x


def _prepare(engine, positions, key_valid, k_len: int, tree):
    """The model's per-step context on this rank's device (with the token tree's mask, when there is one)."""
    dev = engine.device
    kv = key_valid.to(dev) if key_valid is not None else None
    if tree is None:
        return engine.model.prepare(positions.to(dev), kv, k_len, engine.dtype)
    return engine.model.prepare(positions.to(dev), kv, k_len, engine.dtype, tree=tree.to(dev))


def _columns(held: torch.Tensor, now: torch.Tensor) -> tuple[int, int, torch.Tensor | None]:
    """How the other ranks get from the columns they hold to the shadow's now, row by row.

    ``held`` (B, S) and ``now`` (B, L) are the column serials of each (old) row: what the shadow held after
    the last step (= what every other rank holds) and what it holds now, after the lane dropped leading
    columns and (after verifying a token tree) kept only each row's accepted columns. Serials never
    decrease along a row; 0 is a column from before the row joined (padding) and a repeated serial is a
    copy (the padding of a gathered block); either's contents never matter. Returns ``(drop, gather_at,
    gather)``: drop ``drop`` leading columns, then (``gather_at`` >= 0) gather each row's columns from
    ``gather_at`` on by ``gather`` (B, L - gather_at), indices relative to ``gather_at``.
    """
    B, S = held.shape
    L = now.shape[1]
    if L == 0:
        return S, -1, None
    held, now = held.contiguous(), now.contiguous()
    lo = torch.searchsorted(held, now)
    hi = torch.searchsorted(held, now, right=True)
    nth = torch.arange(L) - torch.searchsorted(now, now)  # the k-th copy of a serial maps to its k-th copy
    idx = torch.minimum(lo + nth, hi - 1).clamp(0, S - 1)
    if bool(((now != 0) & (hi == lo)).any()):
        raise RuntimeError("stage shadow cache holds a column the other ranks never computed")
    # Of a run of copies only the last can be a token (a gathered block's padding is left of its tokens)
    care = (now != 0) & torch.cat([now[:, 1:] != now[:, :-1], torch.ones((B, 1), dtype=torch.bool)], dim=1)
    shift = idx - torch.arange(L)
    cols = care.any(0).nonzero()
    drop = int(shift[care[:, int(cols[0])], int(cols[0])].min()) if len(cols) else S - L
    drop = max(0, min(drop, S - L))
    same = (~care | (shift == drop)).all(0)
    at = int((~same).nonzero()[0]) if bool((~same).any()) else L
    if at < L:  # start where the first column the gather reads from is (the lane's own start)
        at = max(0, min(at, int((idx[:, at:] - drop).masked_fill(~care[:, at:], L).min())))
    if at == L and S - drop == L:
        return drop, -1, None  # no gather: a plain prefix drop (or nothing)
    gather = (idx[:, at:] - drop - at).masked_fill(~care[:, at:], 0)
    if bool((gather < 0).any()):
        drop, at = 0, 0  # columns moved left of where the gather starts: gather every column
        gather = idx.masked_fill(~care, 0)
    return drop, at, gather


# ---- views for the governor and the file check ---------------------------------------------------------
class _Entry:
    def __init__(self, entry, index: int):
        self._e, self.layer = entry, index

    def __getattr__(self, name):
        return getattr(self._e, name)


class _NoFile:
    bytes = 0
    data_start = 0
    tensors: dict = {}


class _StageManifest:
    """A manifest seen by one stage: its layers, and the embeddings and head on rank 0 only."""

    def __init__(self, manifest, layers: range, first: bool, local_index: bool = False):
        self._m = manifest
        self.layers = [_Entry(manifest.layer(i), k) if local_index else manifest.layer(i) for k, i in enumerate(layers)]
        self.embeddings = manifest.embeddings if first else _NoFile()
        self.final = manifest.final if first else _NoFile()
        self.num_layers = len(self.layers)

    def layer(self, i: int):
        return self.layers[i]

    def __getattr__(self, name):
        return getattr(self._m, name)


class _OnlyFiles:
    """A manifest whose ``files`` are only some of them (the rest as the manifest has it)."""

    def __init__(self, manifest, files: list):
        self._m, self.files = manifest, files

    def __getattr__(self, name):
        return getattr(self._m, name)


class _StageArgs:
    def __init__(self, args, n: int):
        self._a, self.num_hidden_layers = args, n

    def __getattr__(self, name):
        return getattr(self._a, name)
