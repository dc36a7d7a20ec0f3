"""The memory governor: which layers stay resident, how deep to prefetch, and why.

It measures free memory (psutil for RAM, ``torch.cuda.mem_get_info`` for
VRAM), applies ``--max-memory``, reserves the KV cache for batch x context,
activations and workspace, and picks the fastest mode that fits:
``full`` (every layer resident) > ``partial`` (K layers resident, the rest
streamed) > ``stream`` (nothing resident; a ring of prefetch+1 slots). If even
the ring and the KV cache do not fit, it refuses and says what would fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psutil

from layerrun.errors import LayerRunError
from layerrun.formats.manifest import Manifest

MODES = ("auto", "stream", "partial", "full")
RAM_SAFETY = 256 * 2**20  # left for the OS and allocator slack when no budget is given
GiB = 2**30
MiB = 2**20


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


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

    def explain(self) -> str:
        return "\n".join(self.lines)


def cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit (v1 or v2), or None when unlimited / not in one."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        cands = []
        if "memory" in controllers.split(","):
            cands.append(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        if controllers == "":
            cands.append(f"/sys/fs/cgroup{path}/memory.max")
        for c in cands:
            try:
                raw = open(c).read().strip()
            except OSError:
                continue
            if raw == "max":
                return None
            v = int(raw)
            return v if v < 2**60 else None
    return None


def _dense_bytes(manifest: Manifest, factor: float) -> list[int] | None:
    """Per layer, the bytes of everything but the experts; None if no layer has experts."""
    from layerrun.models.base import expert_index

    out, any_experts = [], False
    for f in manifest.layers:
        dense = sum(t.nbytes for n, t in f.tensors.items() if expert_index(n) is None)
        any_experts = any_experts or dense < f.bytes - f.data_start
        out.append(int(dense * factor))
    return out if any_experts else None


def kv_bytes(args, batch: int, context: int, elem: int) -> int:
    return 2 * args.num_hidden_layers * batch * context * args.num_key_value_heads * args.head_dim * elem


def workspace_bytes(args, batch: int, context: int, elem: int) -> int:
    """Activations of the widest step (prefill of the whole context) plus logits, with slack for temporaries."""
    width = max(args.hidden_size, args.intermediate_size, args.num_attention_heads * args.head_dim)
    act = 4 * batch * context * width * elem  # a few live (B, T, width) tensors
    attn = batch * args.num_attention_heads * min(context, 2048) * context * 4 // 4  # SDPA works in blocks
    logits = 2 * batch * args.vocab_size * 4
    return act + attn + logits + 64 * MiB


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
) -> Plan:
    """The plan (mode, resident and streamed layers, prefetch depth, KV cache place) and its arithmetic.

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
                  device_memory=device_memory, moe_dense=moe_dense)
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
) -> Plan:
    if mode not in MODES:
        raise LayerRunError(f"--mode {mode!r} is not one of: {', '.join(MODES)}")
    if prefetch < 0:
        raise LayerRunError(f"--prefetch must be >= 0, got {prefetch}")
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
    kv = kv_bytes(args, batch, context, elem_bytes)
    kv_where = "host" if kv_host else device
    kv_line = None
    if kv_host and device == "cuda":
        host_free = psutil.virtual_memory().available - RAM_SAFETY
        if kv > host_free:
            raise LayerRunError(f"the KV cache ({fmt(kv)}) does not fit in host memory either ({fmt(host_free)} free)")
        kv_line = (f"KV cache {fmt(kv)} in pinned host memory ({fmt(host_free)} free); one layer's part "
                   f"({fmt(kv // max(args.num_hidden_layers, 1))}) on the device at a time")
        kv = kv // max(args.num_hidden_layers, 1)  # the device holds one layer's share while it computes
    elif kv_host:
        kv_line = "KV cache in host memory, copied per layer (on CPU the same memory: this only exercises the path)"
    work = workspace_bytes(args, batch, context, elem_bytes) + dq
    proc = psutil.Process()
    base = proc.memory_info().rss if baseline is None else baseline
    lines = []
    if device == "cuda":
        if device_memory is None:
            import torch

            device_memory = torch.cuda.mem_get_info()
        free_dev, total_dev = device_memory
        avail = free_dev
        lines.append(f"VRAM free {fmt(free_dev)} of {fmt(total_dev)}")
    else:
        vm = psutil.virtual_memory()
        avail = vm.available - RAM_SAFETY
        lines.append(f"RAM available {fmt(vm.available)} of {fmt(vm.total)} (minus {fmt(RAM_SAFETY)} safety)")
        limit = cgroup_memory_limit()
        if limit is not None and limit - base - RAM_SAFETY < avail:
            avail = limit - base - RAM_SAFETY
            lines.append(f"cgroup memory limit {fmt(limit)} minus process resident {fmt(base)}, minus safety = {fmt(avail)}")
    budget = avail
    if max_memory is not None:
        # The budget covers the whole process: what it already uses counts against it.
        budget = min(avail, max_memory - base)
        lines.append(f"--max-memory {fmt(max_memory)} minus process already resident {fmt(base)} = {fmt(max_memory - base)}")
    lines.append(f"budget for the model: {fmt(budget)}")
    if kv_line:
        lines.append(kv_line)
    if q:
        lines.append(f"quantized {q.get('method', q)}: layers at file size, +{fmt(extra)} repack per staged layer, "
                     f"dequant workspace {fmt(dq)}")
    lines.append(
        f"needs: embeddings+final {fmt(fixed)}, KV cache {fmt(kv)} (batch {batch} x context {context}), "
        f"workspace {fmt(work)}, layers {len(layer_bytes)} x {fmt(max_layer)} = {fmt(sum(layer_bytes))}"
    )
    always = fixed + kv + work
    all_layers = sum(layer_bytes)
    L = len(layer_bytes)

    def ring(depth):
        return (depth + 1) * max_layer

    full_need = always + all_layers
    if mode == "full" or (mode == "auto" and full_need <= budget):
        if mode == "full" and full_need > budget:
            lines.append(f"warning: full mode needs {fmt(full_need)}, over the budget {fmt(budget)}")
        lines.append(f"mode full: {fmt(always)} + all layers {fmt(all_layers)} = {fmt(full_need)} <= {fmt(budget)}")
        return Plan("full", list(range(L)), [], 0, kv_where, budget, full_need, lines)

    depth = prefetch
    stream_need = always + ring(depth)
    while depth > 0 and stream_need > budget and mode in ("auto", "stream", "partial"):
        depth -= 1
        stream_need = always + ring(depth)
    if stream_need > budget:
        # Say what would fit.
        short = []
        per_tok = kv // max(context, 1)
        spare = budget - (fixed + work + ring(0))
        if per_tok and spare > 0:
            short.append(f"a context of at most {max(0, spare // per_tok)} tokens")
        if batch > 1:
            short.append("batch size 1")
        short.append(f"a budget of at least {fmt(base + always + ring(0))}")
        short.append("quantized weights (smaller layers)")
        raise LayerRunError(
            f"the model cannot run in {fmt(budget)}: the ring of one {fmt(max_layer)} slot plus KV cache "
            f"{fmt(kv)}, embeddings {fmt(fixed)} and workspace {fmt(work)} need {fmt(always + ring(0))}. "
            f"Would fit: {'; or '.join(short)}"
        )
    if depth < prefetch:
        lines.append(f"prefetch lowered from {prefetch} to {depth} to fit the budget")
    if mode == "stream":
        lines.append(f"mode stream: {fmt(always)} + ring {depth + 1} x {fmt(max_layer)} = {fmt(stream_need)}")
        return Plan("stream", [], list(range(L)), depth, kv_where, budget, stream_need, lines)
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
        return Plan("partial", list(range(k)), list(range(k, L)), depth, kv_where, budget, total, lines,
                    dense_resident=list(range(k, L)))
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
        return Plan("stream", [], list(range(L)), depth, kv_where, budget, stream_need, lines)
    lines.append(
        f"mode partial: {k} of {L} layers resident ({fmt(acc)}), {L - k} streamed through a ring of "
        f"{depth + 1} x {fmt(max_layer)}; total {fmt(stream_need + acc)}"
    )
    return Plan("partial", list(range(k)), list(range(k, L)), depth, kv_where, budget, stream_need + acc, lines)
