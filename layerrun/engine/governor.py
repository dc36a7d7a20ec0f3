"""The memory governor: which layers stay resident, how deep to prefetch, and why.

The budget is what this process may still use: free RAM (psutil) less a margin for the system, the
cgroup limit less what the process already holds (measured: Python, torch and the tokenizer are
loaded when it plans), ``--max-memory`` less the same, or free VRAM on CUDA. From it come the
embeddings and final layers, a ring of prefetch+1 layer slots, and the KV cache and workspace for
the sequences the run plans for (a single ``generate``: one sequence; a server or a prompts file:
``--batch-size`` of them), each reserved for :data:`DEFAULT_RESERVE` tokens to begin with. Then the
fastest mode that fits: ``full`` (every layer resident) > ``partial`` (K layers resident, the rest
streamed) > ``stream`` (nothing resident). What is left after the layers is the room the KV cache and
workspace may grow into; a sequence that needs more (a long prompt, many new tokens) makes the engine
demote resident layers to streamed ones (:func:`plan_memory` again, with the larger reservation), and
one that would not fit even then is refused with what would. If even the ring and one short sequence
do not fit, loading refuses and says what would fit, in figures a person can check.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass, field

import psutil

from layerrun.errors import LayerRunError
from layerrun.formats.manifest import Manifest

MODES = ("auto", "stream", "partial", "full")
RAM_SAFETY = 256 * 2**20  # host RAM left for the system and other programs when no cgroup or budget says otherwise
GiB = 2**30
MiB = 2**20
DEFAULT_RESERVE = 512  # tokens per sequence the KV cache is first planned for; it grows on demand
KV_MIN_CAPACITY = 256  # LayerKV's smallest allocation (tokens); it grows by doubling
STEP_OVERHEAD = 16 * MiB  # per-step Python objects, index tensors, allocator slack (measured: bench/RESULTS.md)
CGROUP_SLACK_MIN = 24 * MiB  # kept free under a cgroup limit for kernel memory and file reads in flight
MMAP_THRESHOLD = 1 * MiB  # glibc: allocations this size and up are mapped, and so returned to the system when freed


def fmt(n: float) -> str:
    n = max(n, 0)  # callers say "nothing left" where a difference would go below zero
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


@dataclass
class Plan:
    mode: str
    resident: list[int]
    streamed: list[int]
    prefetch: int
    kv_location: str
    budget: int
    need: int
    lines: list[str] = field(default_factory=list)
    # mixture-of-experts: streamed layers whose attention, norms and router stay resident (only
    # their routed experts are read per step)
    dense_resident: list[int] = field(default_factory=list)
    baseline: int = 0  # what the process held when it planned (Python, torch, tokenizer): measured
    reserve: tuple[int, int] = (1, DEFAULT_RESERVE)  # (sequences, tokens each) the KV cache was planned for
    reserved: int = 0  # bytes of ``need`` that are KV cache and workspace for ``reserve``

    @property
    def room(self) -> int:
        """Bytes of the budget the KV cache and step workspace may use (what the weights leave)."""
        return self.budget - (self.need - self.reserved)

    def explain(self) -> str:
        return "\n".join(self.lines)


def process_rss() -> int:
    return psutil.Process().memory_info().rss


def tame_allocator() -> None:
    """glibc: map allocations of :data:`MMAP_THRESHOLD` and up, so a freed activation or KV cache goes
    back to the system at once. By default glibc raises this threshold as large blocks are freed and
    then keeps them in its heaps: the process's memory then only grows (measured: bench/RESULTS.md)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _cgroup_dir() -> tuple[str, str] | None:
    """(version, folder) of this process's memory cgroup, or None."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return "v1", f"/sys/fs/cgroup/memory{path}"
        if controllers == "":
            return "v2", f"/sys/fs/cgroup{path}"
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit (v1 or v2), or None when unlimited / not in one."""
    cg = _cgroup_dir()
    if cg is None:
        return None
    kind, d = cg
    raw = _read(f"{d}/memory.limit_in_bytes" if kind == "v1" else f"{d}/memory.max")
    if raw is None or raw == "max":
        return None
    try:
        v = int(raw)
    except ValueError:
        return None
    return v if v < 2**60 else None


def cgroup_unreclaimable() -> int | None:
    """Bytes charged to this process's cgroup that the kernel cannot reclaim (its charge less the page
    cache), i.e. what every process in it holds: at least this process's own anonymous memory."""
    cg = _cgroup_dir()
    if cg is None:
        return None
    kind, d = cg
    usage = _read(f"{d}/memory.usage_in_bytes" if kind == "v1" else f"{d}/memory.current")
    stat = _read(f"{d}/memory.stat")
    if usage is None or stat is None:
        return None
    fields = dict(line.split()[:2] for line in stat.splitlines() if len(line.split()) >= 2)
    cache_key = "total_cache" if kind == "v1" else "file"
    try:
        return max(int(usage) - int(fields.get(cache_key, 0)), 0)
    except ValueError:
        return None


def cgroup_slack(limit: int) -> int:
    """Left free under a cgroup limit: kernel memory charged to the cgroup (page tables, sockets) and
    the page cache of reads in flight, which the kernel cannot reclaim while they run."""
    return max(CGROUP_SLACK_MIN, limit // 64)


def _dense_bytes(manifest: Manifest, factor: float) -> list[int] | None:
    """Per layer, the bytes of everything but the experts; None if no layer has experts."""
    from layerrun.models.base import expert_index

    out, any_experts = [], False
    for f in manifest.layers:
        dense = sum(t.nbytes for n, t in f.tensors.items() if expert_index(n) is None)
        any_experts = any_experts or dense < f.bytes - f.data_start
        out.append(int(dense * factor))
    return out if any_experts else None


def kv_capacity(tokens: int) -> int:
    """Tokens a LayerKV allocates to hold ``tokens`` (it starts at 256 and doubles)."""
    return max(KV_MIN_CAPACITY, 1 << max(int(tokens) - 1, 0).bit_length())


def kv_bytes(args, batch: int, context: int, elem: int) -> int:
    return 2 * args.num_hidden_layers * batch * context * args.num_key_value_heads * args.head_dim * elem


def kv_alloc_bytes(args, rows: int, tokens: int, elem: int) -> int:
    """What the KV cache of ``rows`` sequences of ``tokens`` positions allocates: every layer's buffer at
    its doubling capacity, plus one layer's old buffer while it grows (layers grow one at a time)."""
    per = kv_bytes(args, rows, kv_capacity(tokens), elem)
    return per + per // max(args.num_hidden_layers, 1)


def workspace_bytes(args, batch: int, context: int, elem: int, keys: int | None = None) -> int:
    """Peak activations of a step feeding ``context`` tokens to each of ``batch`` rows that attend over
    ``keys`` positions (default: the same): a layer's live (B, T, width) tensors (its MLP's four of the
    intermediate width, four of the hidden width, queries and their rotated copy), attention's blocked
    scores and the batch mask, and the last position's logits."""
    keys = context if keys is None else keys
    inter = max(args.intermediate_size, args.hidden_size)
    q = args.num_attention_heads * args.head_dim
    act = batch * context * (4 * inter + 4 * args.hidden_size + 2 * q) * elem
    attn = batch * args.num_attention_heads * min(context, 2048) * keys  # SDPA works in blocks
    mask = batch * context * keys  # bool (B, 1, T, S) when rows are padded
    logits = 2 * batch * args.vocab_size * 4
    return act + attn + mask + logits + STEP_OVERHEAD


def sequences_need(args, rows: int, step_tokens: int, keys: int, elem: int) -> int:
    """KV cache and workspace for ``rows`` sequences whose cache reaches ``keys`` positions, in a step
    of ``step_tokens`` new tokens per row."""
    return kv_alloc_bytes(args, rows, keys, elem) + workspace_bytes(args, rows, step_tokens, elem, keys)


KV_PLACES = ("auto", "device", "host")


def plan_memory(
    manifest: Manifest,
    args,
    mode: str = "auto",
    max_memory: int | None = None,
    prefetch: int = 2,
    batch: int = 1,
    context: int = 2048,
    device: str = "cpu",
    elem_bytes: int = 4,
    cast_factor: float = 1.0,
    baseline: int | None = None,
    kv: str = "auto",
    device_memory: tuple[int, int] | None = None,
    moe_dense: bool = False,
    budget: int | None = None,
) -> Plan:
    """The plan (mode, resident and streamed layers, prefetch depth, KV cache place) and its arithmetic.

    ``batch`` sequences of ``context`` tokens each are what the KV cache and workspace are planned for
    (the reservation; it grows later on demand). ``baseline``: what the process holds besides the model
    (default: its resident memory now, measured). ``budget``: the bytes for the model, decided earlier
    (a replan keeps the budget measured at load; by default it is measured now).

    ``kv``: where the KV cache lives. ``device``: with the layers that compute (on CPU, host memory
    anyway); ``host``: in host memory, each layer's part copied to the device for its compute;
    ``auto``: on the device unless that leaves less room for resident layers than the cache's own
    size (the bytes that would then be streamed per token instead of the cache's), or does not fit.
    ``device_memory``: (free, total) device bytes, instead of asking CUDA (planning for another machine).
    ``moe_dense``: a mixture-of-experts model whose streamed layers read only routed experts: in
    auto/partial mode, keep every layer's attention, norms and router resident before any whole
    layer (per resident byte, that saves the most reading per token).
    """
    if kv not in KV_PLACES:
        raise LayerRunError(f"--kv-cache {kv!r} is not one of: {', '.join(KV_PLACES)}")
    common = dict(manifest=manifest, args=args, mode=mode, max_memory=max_memory, prefetch=prefetch, batch=batch,
                  context=context, device=device, elem_bytes=elem_bytes, cast_factor=cast_factor, baseline=baseline,
                  device_memory=device_memory, moe_dense=moe_dense, budget=budget)
    if kv == "host" or (kv == "auto" and device != "cuda"):
        return _plan_once(**common, kv_host=kv == "host")
    if kv == "device":
        return _plan_once(**common, kv_host=False)
    dev_error = None
    try:
        on_dev = _plan_once(**common, kv_host=False)
    except LayerRunError as e:
        on_dev, dev_error = None, e
    if on_dev is not None and on_dev.mode == "full":
        return on_dev
    try:
        on_host = _plan_once(**common, kv_host=True)
    except LayerRunError:
        if on_dev is None:
            raise dev_error from None
        return on_dev
    if on_dev is None:
        on_host.lines.append("KV cache on the device does not fit; it lives in host memory instead")
        return on_host
    sizes = {f.layer: f.bytes - f.data_start for f in manifest.layers}
    gained = sum(sizes[i] for i in on_host.resident) - sum(sizes[i] for i in on_dev.resident)
    kv_bytes_ = kv_bytes(args, batch, context, elem_bytes)
    if gained > kv_bytes_:
        on_host.lines.append(
            f"KV cache in host memory: {fmt(gained)} more resident layers than with it on the device, "
            f"more than the {fmt(kv_bytes_)} of cache that then travels with its layers each step")
        return on_host
    on_dev.lines.append(f"KV cache on the device: moving it to host memory would gain only {fmt(max(gained, 0))} "
                        f"of resident layers, less than its {fmt(kv_bytes_)}")
    return on_dev


def memory_budget(device: str, max_memory: int | None, base: int,
                  device_memory: tuple[int, int] | None = None) -> tuple[int, list[str], str]:
    """(bytes the model may use, the arithmetic as lines, what bounds it: for messages)."""
    lines = []
    if device == "cuda":
        if device_memory is None:
            import torch

            device_memory = torch.cuda.mem_get_info()
        free_dev, total_dev = device_memory
        lines.append(f"VRAM free {fmt(free_dev)} of {fmt(total_dev)}")
        avail, bound = free_dev, "free VRAM"
    else:
        vm = psutil.virtual_memory()
        avail, bound = vm.available - RAM_SAFETY, "free RAM"
        lines.append(f"RAM available {fmt(vm.available)} of {fmt(vm.total)}, {fmt(RAM_SAFETY)} of it left for the system")
        limit = cgroup_memory_limit()
        if limit is not None:
            held = max(base, cgroup_unreclaimable() or 0)
            slack = cgroup_slack(limit)
            room = limit - held - slack
            if room < avail:
                avail, bound = room, f"the cgroup memory limit ({fmt(limit)})"
                who = "the process itself uses" if held == base else "the processes in the cgroup hold"
                lines.append(f"cgroup memory limit {fmt(limit)}: {who} {fmt(held)}, {fmt(slack)} kept free for "
                             f"the kernel and reads in flight: " + (f"{fmt(room)} left" if room > 0 else "nothing left"))
    if max_memory is not None:
        room = max_memory - base
        if room < avail:
            avail, bound = room, f"--max-memory {fmt(max_memory)}"
        lines.append(f"--max-memory {fmt(max_memory)}: the process itself uses {fmt(base)} (Python, torch, the "
                     f"tokenizer): " + (f"{fmt(room)} left" if room > 0 else "nothing left"))
    return max(avail, 0), lines, bound


def _plan_once(
    manifest: Manifest,
    args,
    mode: str,
    max_memory: int | None,
    prefetch: int,
    batch: int,
    context: int,
    device: str,
    elem_bytes: int,
    cast_factor: float,
    baseline: int | None,
    kv_host: bool,
    device_memory: tuple[int, int] | None = None,
    moe_dense: bool = False,
    budget: int | None = None,
) -> Plan:
    if mode not in MODES:
        raise LayerRunError(f"--mode {mode!r} is not one of: {', '.join(MODES)}")
    if prefetch < 0:
        raise LayerRunError(f"--prefetch must be >= 0, got {prefetch}")
    if batch < 1 or context < 1:
        raise LayerRunError(f"the KV cache must be planned for at least one sequence of one token; got {batch} x {context}")
    q = manifest.quantization
    if q:
        # Quantized layers compute from the read buffer (never cast); prefill dequantizes one weight at a time.
        from layerrun.formats.quant import dequant_workspace_bytes, prepared_extra_bytes

        layer_bytes = [f.bytes - f.data_start for f in manifest.layers]
        extra = max((prepared_extra_bytes(f, q, device) for f in manifest.layers), default=0)
        dq = max((dequant_workspace_bytes(f, q, elem_bytes) for f in manifest.layers), default=0)
    else:
        layer_bytes = [int((f.bytes - f.data_start) * cast_factor) for f in manifest.layers]
        extra = dq = 0
    max_layer = max(layer_bytes, default=0) + extra
    fixed = int((manifest.embeddings.bytes + manifest.final.bytes) * cast_factor)
    L_ = max(args.num_hidden_layers, 1)
    kv = kv_bytes(args, batch, kv_capacity(context), elem_bytes)
    kv_where = "host" if kv_host else device
    kv_line = None
    if kv_host and device == "cuda":
        host_free = psutil.virtual_memory().available - RAM_SAFETY
        if kv > host_free:
            raise LayerRunError(f"the KV cache ({fmt(kv)}) does not fit in host memory either ({fmt(host_free)} free)")
        kv_line = (f"KV cache {fmt(kv)} in pinned host memory ({fmt(host_free)} free); one layer's part "
                   f"({fmt(kv // L_)}) on the device at a time")
        kv = kv // L_  # the device holds one layer's share while it computes
    elif kv_host:
        kv_line = "KV cache in host memory, copied per layer (on CPU the same memory: this only exercises the path)"
    # a step's activations, plus one layer's old cache while that layer's grows (layers grow one at a time)
    work = workspace_bytes(args, batch, context, elem_bytes) + dq + kv // L_
    base = process_rss() if baseline is None else baseline
    if budget is None:
        budget, lines, bound = memory_budget(device, max_memory, base, device_memory)
    else:
        lines, bound = [], "the budget measured when the model was loaded"
    lines.append(f"budget for the model: {fmt(budget)}")
    if kv_line:
        lines.append(kv_line)
    if q:
        lines.append(f"quantized {q.get('method', q)}: layers at file size, +{fmt(extra)} repack per staged layer, "
                     f"dequant workspace {fmt(dq)}")
    seqs = "1 sequence" if batch == 1 else f"{batch} sequences"
    lines.append(
        f"needs: embeddings+final {fmt(fixed)}, KV cache {fmt(kv)} ({seqs} x {context} tokens to begin with; "
        f"it grows on demand), workspace {fmt(work)}, layers {len(layer_bytes)} x {fmt(max_layer)} = "
        f"{fmt(sum(layer_bytes))}"
    )
    always = fixed + kv + work
    all_layers = sum(layer_bytes)
    L = len(layer_bytes)
    reserve = (batch, context)

    def plan(mode_, resident, streamed, depth, need, **kw) -> Plan:
        return Plan(mode_, resident, streamed, depth, kv_where, budget, need, lines, baseline=base, reserve=reserve,
                    reserved=kv + work, **kw)

    def ring(depth):
        return (depth + 1) * max_layer

    full_need = always + all_layers
    if mode == "full" or (mode == "auto" and full_need <= budget):
        if mode == "full" and full_need > budget:
            lines.append(f"warning: full mode needs {fmt(full_need)}, more than the budget of {fmt(budget)}")
        lines.append(f"mode full: {fmt(always)} + all layers {fmt(all_layers)} = {fmt(full_need)}"
                     + (f" <= {fmt(budget)}" if full_need <= budget else ""))
        return plan("full", list(range(L)), [], 0, full_need)

    depth = prefetch
    stream_need = always + ring(depth)
    while depth > 0 and stream_need > budget:
        depth -= 1
        stream_need = always + ring(depth)
    if stream_need > budget:
        raise LayerRunError(_refusal(args, manifest, device, bound, base, budget, max_memory, batch, context,
                                     elem_bytes, fixed, work, kv, max_layer, always + ring(0)))
    if depth < prefetch:
        lines.append(f"prefetch lowered from {prefetch} to {depth} to fit the budget")
    if mode == "stream":
        lines.append(f"mode stream: {fmt(always)} + ring {depth + 1} x {fmt(max_layer)} = {fmt(stream_need)}")
        return plan("stream", [], list(range(L)), depth, stream_need)
    spare = budget - stream_need
    dense_bytes = _dense_bytes(manifest, 1.0 if q else cast_factor) if moe_dense and mode != "stream" else None
    if dense_bytes is not None and sum(dense_bytes) <= spare:
        # Whole layers with what is left: each costs its experts on top of its dense part, resident already.
        rest = spare - sum(dense_bytes)
        k = acc = 0
        for b, d in zip(layer_bytes, dense_bytes):
            if acc + b - d > rest:
                break
            acc += b - d
            k += 1
        k = min(k, L - 1)
        total = stream_need + sum(dense_bytes) + acc
        lines.append(
            f"mode partial (mixture of experts): attention, norms and router of all {L} layers resident "
            f"({fmt(sum(dense_bytes))}), {k} whole layers resident (+{fmt(acc)} of experts); the experts of "
            f"{L - k} layers streamed, only the routed ones read, through a ring of {depth + 1} x {fmt(max_layer)}; "
            f"total {fmt(total)}"
        )
        return plan("partial", list(range(k)), list(range(k, L)), depth, total, dense_resident=list(range(k, L)))
    k = 0
    acc = 0
    for b in layer_bytes:
        if acc + b > spare:
            break
        acc += b
        k += 1
    k = min(k, L - 1)
    if k == 0:
        lines.append(f"mode stream: no room for resident layers ({fmt(spare)} spare); ring {depth + 1} x {fmt(max_layer)}")
        return plan("stream", [], list(range(L)), depth, stream_need)
    lines.append(
        f"mode partial: {k} of {L} layers resident ({fmt(acc)}), {L - k} streamed through a ring of "
        f"{depth + 1} x {fmt(max_layer)}; total {fmt(stream_need + acc)}"
    )
    return plan("partial", list(range(k)), list(range(k, L)), depth, stream_need + acc)


def _refusal(args, manifest, device, bound, base, budget, max_memory, batch, context, elem, fixed, work, kv, max_layer,
             need) -> str:
    """The message when even streaming with a ring of one slot does not fit: what the process holds,
    what streaming needs on top, the smallest budget that works, and what else would fit."""
    seqs = "1 sequence" if batch == 1 else f"{batch} sequences"
    parts = (f"one layer slot {fmt(max_layer)}, embeddings and final layers {fmt(fixed)}, KV cache {fmt(kv)} "
             f"for {seqs} x {context} tokens, workspace {fmt(work)}")
    if device == "cuda":
        head = f"the model cannot run in {bound} ({fmt(budget)}): streaming it needs {fmt(need)} ({parts})"
        at_least = f"at least {fmt(need)} of free VRAM"
    else:
        left = f"{fmt(budget)} left" if budget > 0 else "nothing left"
        head = (f"the model cannot run within {bound}: the process itself uses {fmt(base)} (Python, torch, the "
                f"tokenizer), {left}; streaming it needs {fmt(need)} more ({parts})")
        if bound.startswith("--max-memory"):
            at_least = f"--max-memory of at least {fmt(base + need)}"
        elif bound.startswith("the cgroup"):
            limit = cgroup_memory_limit() or 0
            held = max(base, cgroup_unreclaimable() or 0)
            at_least = f"a cgroup memory limit of at least {fmt(held + cgroup_slack(limit) + need)}"
        else:
            at_least = f"{fmt(need - budget)} more free RAM"
    fits = [at_least]
    if batch > 1:
        fits.append("fewer sequences at once (--batch-size)")
    per_tok = kv_bytes(args, batch, 1, elem) + workspace_bytes(args, batch, 1, elem) - workspace_bytes(args, batch, 0, elem)
    spare = budget - (need - kv - work) - workspace_bytes(args, batch, 0, elem)
    if per_tok > 0 and spare > KV_MIN_CAPACITY * per_tok and context > KV_MIN_CAPACITY:
        fits.append(f"a context of at most {spare // per_tok} tokens (--context)")
    if not manifest.quantization:
        fits.append("quantized weights (`layerrun convert --quantize int8`: smaller layers)")
    return f"{head}. Would fit: {'; or '.join(fits)}"
