"""Past one machine: a model's layers split into stages, one per ``torchrun`` rank.

``torchrun --nproc-per-node N -m layerrun generate|serve MODEL ...`` (or ``--nnodes`` across hosts)
starts N copies of the command with ``WORLD_SIZE`` / ``RANK`` set. :func:`connect` joins them into a
gloo process group, checks that every rank has the same model (the sha256 of its ``layerrun.json``
and ``config.json``), asks each rank what it has (free memory, a quick read-rate probe) and places
a contiguous range of layers on each (:func:`place`, or ``--stages 0-9,10-29``). Every rank then
loads an :class:`~layerrun.engine.engine.Engine` over its own range only, with its own governor and
pipeline; rank 0 also keeps the tokenizer, embeddings, head and sampling (and the server). The step's
data path is :mod:`layerrun.engine.stages`.

Without ``WORLD_SIZE`` > 1 nothing here runs.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from layerrun.errors import LayerRunError

DEFAULT_STAGE_TIMEOUT = 300.0  # seconds one stage may take for a step (or stay silent) before it counts as gone
PROBE_BYTES = 16 * 2**20  # the read-rate probe reads at most this much of one layer file


def launched() -> bool:
    """Whether this process is one rank of several (``torchrun`` sets ``WORLD_SIZE`` and ``RANK``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


@dataclass
class RankInfo:
    """What one rank reports at start."""

    rank: int
    host: str
    model_sha: str  # sha256 of layerrun.json + config.json
    free_bytes: int  # available memory (or --max-memory, if smaller)
    read_bytes_per_s: float  # the probe's rate (0 when this rank holds no layer file)
    layer_files: list[int]  # the layers whose files this rank has


def parse_stages(text: str, num_layers: int, world: int) -> list[range]:
    """``--stages 0-9,10-29``: one contiguous range per rank, in rank order, covering every layer once."""
    ranges = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            a, _, b = part.partition("-")
            lo, hi = int(a), int(b) if b else int(a)
        except ValueError:
            raise LayerRunError(f"--stages {text!r}: {part!r} is not a layer range like 0-9") from None
        ranges.append(range(lo, hi + 1))
    if len(ranges) != world:
        raise LayerRunError(f"--stages {text!r} names {len(ranges)} stages, but {world} ranks were launched "
                            f"(give one range per rank, in rank order)")
    expect = 0
    for r in ranges:
        if r.start != expect or len(r) < 1:
            raise LayerRunError(f"--stages {text!r}: the ranges must be contiguous, in order, each at least one "
                                f"layer, starting at 0 (expected a range starting at {expect})")
        expect = r.stop
    if expect != num_layers:
        raise LayerRunError(f"--stages {text!r} covers layers 0-{expect - 1}, but the model has {num_layers} "
                            f"(0-{num_layers - 1})")
    return ranges


def place(layer_bytes: list[int], infos: list[RankInfo], ends: int = 0) -> tuple[list[range], str]:
    """Contiguous layer ranges in proportion to what each rank brings, and why.

    When every layer fits in the ranks' memory together, each rank holds its share resident and
    the split follows free memory; otherwise the ranks stream, a stage's time per token is its
    bytes over its read rate, and the split follows the read rates (equal stage times). ``ends``: the
    bytes of the embeddings and head, which rank 0 holds besides its layers.
    """
    n, total = len(infos), sum(layer_bytes)
    if len(layer_bytes) < n:
        raise LayerRunError(f"{n} ranks for a model of {len(layer_bytes)} layers: launch at most {len(layer_bytes)}")
    free = [max(i.free_bytes - (ends if r == 0 else 0), 1) for r, i in enumerate(infos)]
    rates = [i.read_bytes_per_s for i in infos]
    if sum(free) >= 1.2 * total + ends:
        weights, why = free, "by free memory (the layers fit in the ranks' memory together)"
    elif all(r > 0 for r in rates):
        weights, why = rates, "by read rate (the ranks stream: equal bytes / rate per stage)"
    else:
        weights, why = free, "by free memory (some rank has no layer file to probe its read rate)"
    # Cut the cumulative bytes nearest the cumulative weights, every stage at least one layer.
    L, cum = len(layer_bytes), [0]
    for b in layer_bytes:
        cum.append(cum[-1] + b)
    bounds = [0]
    for r in range(n - 1):
        target = total * sum(weights[: r + 1]) / sum(weights)
        bounds.append(min(range(bounds[-1] + 1, L - (n - 1 - r) + 1), key=lambda k: abs(cum[k] - target)))
    bounds.append(L)
    return [range(bounds[r], bounds[r + 1]) for r in range(n)], why


def _model_sha(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("layerrun.json", "config.json"):
        try:
            h.update((folder / name).read_bytes())
        except OSError:
            h.update(b"missing " + name.encode())
    return h.hexdigest()


def _probe_read(folder: Path, manifest, throttle: str | None) -> tuple[float, list[int]]:
    """(bytes/s reading the largest layer file this rank has, the layers whose files it has)."""
    from layerrun.io.throttle import parse_size

    have = [f.layer for f in manifest.layers if (folder / f.name).is_file()]
    if not have:
        return 0.0, have
    entry = max((manifest.layer(i) for i in have), key=lambda f: f.bytes)
    n = min(PROBE_BYTES, entry.bytes)
    from layerrun.io.reader import open_layer_file

    t0 = time.perf_counter()
    fd, _ = open_layer_file(folder, entry)  # confined to the folder, as every read of a layer file
    try:
        got = 0
        while got < n:
            b = os.pread(fd, min(4 * 2**20, n - got), got)
            if not b:
                break
            got += len(b)
    finally:
        os.close(fd)
    rate = got / max(time.perf_counter() - t0, 1e-6)
    if throttle:
        rate = min(rate, float(parse_size(throttle, "--throttle")))
    return rate, have


def _free_bytes(max_memory) -> int:
    import psutil

    from layerrun.engine.governor import cgroup_memory_limit
    from layerrun.io.throttle import parse_size

    free = psutil.virtual_memory().available
    limit = cgroup_memory_limit()
    if limit is not None:
        free = min(free, limit - psutil.Process().memory_info().rss)
    if max_memory is not None:
        free = min(free, parse_size(max_memory, "--max-memory"))
    return int(free)


def connect(model: str, stages: str | None = None, timeout: float = DEFAULT_STAGE_TIMEOUT,
            max_memory=None, throttle=None):
    """Join the ranks (gloo), check the model is the same everywhere, place the layers.

    Returns this rank's :class:`~layerrun.engine.stages.Stage`. Every rank calls it with its own
    command line (``--max-memory``, ``--throttle`` may differ between hosts; ``--stages`` is rank 0's).
    """
    import torch.distributed as dist

    if timeout <= 0:
        raise LayerRunError(f"--stage-timeout must be > 0 seconds, got {timeout}")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:
        raise LayerRunError(f"rank {rank} of {world}: could not join the other ranks ({e}); launch with torchrun "
                            f"(MASTER_ADDR / MASTER_PORT or --rdzv-endpoint must reach rank 0)") from None
    try:
        return _place_ranks(dist, rank, world, model, stages, timeout, max_memory, throttle)
    except BaseException:
        # Leave the group before exiting: a gloo group still alive at interpreter exit can abort the
        # process ("terminate called without an active exception") while its peers disconnect.
        dist.destroy_process_group()
        raise


def _place_ranks(dist, rank: int, world: int, model: str, stages, timeout: float, max_memory, throttle):
    from layerrun.engine.engine import resolve_model_path
    from layerrun.engine.stages import Stage
    from layerrun.formats.manifest import Manifest

    folder = resolve_model_path(model)
    manifest = Manifest.read(folder)
    rate, have = _probe_read(folder, manifest, throttle)
    me = RankInfo(rank, socket.gethostname(), _model_sha(folder), _free_bytes(max_memory), rate, have)
    infos: list = [None] * world
    dist.all_gather_object(infos, me)
    ref = infos[0].model_sha
    bad = [i for i in infos if i.model_sha != ref]
    if bad:
        who = ", ".join(f"rank {i.rank} on {i.host}" for i in bad)
        raise LayerRunError(f"the model differs between ranks: {who} {'has' if len(bad) == 1 else 'have'} a "
                            f"layerrun.json / config.json other than rank 0's ({ref[:12]}); copy the same converted "
                            f"model to every host")
    layer_bytes = [f.bytes for f in manifest.layers]
    # Rank 0 decides (its --stages), everyone follows.
    decision: list = [None]
    if rank == 0:
        try:
            if stages:
                decision[0] = (parse_stages(stages, len(layer_bytes), world), "as given by --stages", None)
            else:
                ranges, why = place(layer_bytes, infos, manifest.embeddings.bytes + manifest.final.bytes)
                decision[0] = (ranges, why, None)
        except LayerRunError as e:
            decision[0] = (None, None, str(e))
    dist.broadcast_object_list(decision, src=0)
    ranges, why, error = decision[0]
    if error:
        raise LayerRunError(error)
    missing = [i for i in ranges[rank] if i not in have]
    mine = (f"rank {rank} on {me.host}: {folder} lacks the files of its layers {_span(missing)} (stage {rank} is "
            f"layers {_span(list(ranges[rank]))}); copy them (`layerrun stage-files MODEL --stages ... --rank {rank}` "
            f"lists them) or pass --stages") if missing else None
    said: list = [None] * world
    dist.all_gather_object(said, mine)  # every rank stops, with the same line, if one lacks its files
    if any(said):
        raise LayerRunError("; ".join(m for m in said if m))
    lines = explain(ranges, infos, layer_bytes, why)
    stage = Stage(rank, world, ranges, timeout, lines)
    here = sum(i.host == me.host for i in infos)
    if here > 1:  # every rank on this host measured the same free memory
        stage.host_share = me.free_bytes // here
    return stage


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def explain(ranges: list[range], infos: list[RankInfo], layer_bytes: list[int], why: str) -> list[str]:
    from layerrun.engine.governor import fmt

    out = [f"stages: {len(ranges)} ranks over {len(layer_bytes)} layers, split {why}"]
    for r, (rng, info) in enumerate(zip(ranges, infos)):
        extra = "; also tokenizer, embeddings, head, sampling" if r == 0 else ""
        out.append(f"stage {r} (rank {r} on {info.host}): layers {rng.start}-{rng.stop - 1} "
                   f"({fmt(sum(layer_bytes[i] for i in rng))}), free {fmt(info.free_bytes)}, "
                   f"probe {info.read_bytes_per_s / 1e9:.2f} GB/s{extra}")
    return out


def stage_files(manifest, layers: range, first: bool) -> list[str]:
    """The files a stage's rank needs: config and manifest, its layers, and on rank 0 the ends and tokenizer."""
    names = ["config.json", "layerrun.json"] + [manifest.layer(i).name for i in layers]
    if first:
        names += [manifest.embeddings.name, manifest.final.name]
    return names
