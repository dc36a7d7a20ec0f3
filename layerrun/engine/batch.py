"""The generation loop: one layer load serves many sequences, and each sequence may get many tokens.

In stream mode every decode step reads the whole model, so tokens/s past the
disk's limit come from running many sequences through each layer while it is
loaded, and from getting more than one token per sequence out of each pass.
:class:`BatchGenerator` keeps a live batch of up to ``max_batch`` sequences; at
every step boundary finished sequences leave and waiting ones join (continuous
batching). A single sequence (``Engine.stream``) is a batch of one.

One step: rows with a draft (:mod:`layerrun.engine.speculative`) grow a token
tree from their last token; one target pass computes every row's block (a tree,
the last token alone, or a joining row's whole prompt); each tree is verified
(the accepted path and one more token come out, exactly what decoding one token
at a time would give) and the KV caches keep only the accepted paths.

Layout (:mod:`layerrun.engine.lane`): every row is right-aligned in each block,
so each row's newest token is in the last column; the lane's ``key_pos`` (B, S)
holds each cached key's token position, -1 for padding, which gives both the
attention mask and sliding windows measured in tokens even across padding gaps.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from layerrun.engine.lane import Lane
from layerrun.engine.sampling import SamplingParams
from layerrun.engine.speculative import MAX_DEPTH, SpecRow, SpecTotals, Tree
from layerrun.engine.telemetry import GenerationStats
from layerrun.engine.text import split_stop
from layerrun.engine.tokenizer import StreamDecoder
from layerrun.errors import LayerRunError

_ids = itertools.count()


@dataclass
class Request:
    """One sequence: its prompt, sampling settings, and (as it runs) its output."""

    prompt_ids: list[int]
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # Per-request logits processors (penalties, a grammar): see ``sample_rows``.
    processors: list = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the k most likely
    speculate: bool = True  # use the engine's draft, if it has one
    id: int = field(default_factory=lambda: next(_ids))
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    cancelled: bool = False
    # runtime
    _sampler: Callable | None = None
    _decoder: StreamDecoder | None = None
    _held: str = ""
    _pos: int = 0  # position of the next token to feed (= the cache entries this row holds)
    reused_prompt_tokens: int = 0  # prompt tokens whose KV entries came from the previous sequence (reuse_prefix)
    _next: int | None = None  # token to feed at the next step
    _joined_at: float = 0.0
    _submitted_at: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Event:
    """What one step produced for one request: new text, the token, and whether it finished.
    A step can produce several events for one request (speculation: the accepted tokens)."""

    request: Request
    text: str
    token_id: int | None
    finish_reason: str | None = None
    logprob: float | None = None  # of token_id under the model's distribution (when the request asked)
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class _Block:
    """One row's part of a step's block: its tokens, their positions, its tree (None: a chain)."""

    tokens: list[int]
    start: int
    tree: Tree | None = None


class BatchGenerator:
    def __init__(self, engine, max_batch: int = 8, reuse_prefix: bool = False):
        """``reuse_prefix``: when a lone sequence finishes, keep its KV cache; a next lone sequence whose
        prompt begins with the same tokens (a chat's next turn) starts from it and prefills only the rest."""
        if max_batch < 1:
            raise LayerRunError(f"--batch-size must be >= 1, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self.reuse_prefix = reuse_prefix and getattr(engine.model, "rerun_prefix_at", None) is None
        self._kept: tuple[list[int], object, torch.Tensor] | None = None  # (ids the cache holds, cache, key_pos)
        self.rows: list[Request] = []
        self.waiting: deque[Request] = deque()
        self.lane = Lane(engine)  # the model's KV cache for the live rows
        self.spec = getattr(engine, "speculator", None)
        self.drafting = self.spec.draft.session() if self.spec is not None else None  # the draft's state, row for row
        self.steps = 0
        self.last_stats: GenerationStats | None = None  # the latest step's figures (bytes read, stall); the server reads them
        self.last_spec = SpecTotals()  # the latest step's drafted and accepted tokens

    # ---- requests ---------------------------------------------------------
    def request(
        self,
        prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        chat: bool | None = None,
        system: str | None = None,
        ignore_eos: bool = False,
        speculate: bool = True,
        **options,
    ) -> Request:
        """Build and check a request (raises LayerRunError on bad input) and queue it.

        ``speculate=False``: decode one token per pass even when the engine has a draft.
        ``options``: the other sampling fields (``min_p``, penalties), ``logprobs``, structured output
        (``json_schema``, ``response_format``) and chat template fields; see
        :func:`layerrun.engine.request_options.build_request_options`.
        """
        from layerrun.engine.request_options import build_request_options

        eng = self.engine
        ids, max_new, params, sampler, stops, extra = build_request_options(
            eng, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, chat, system, options
        )
        req = Request(list(ids), max_new, params, stops, ignore_eos, processors=extra.processors,
                      logprobs=extra.logprobs, speculate=bool(speculate))
        req._sampler = sampler
        req._decoder = StreamDecoder(eng.tokenizer) if eng.has_tokenizer else None
        req.stats = eng._new_stats(len(ids))
        if self.spec is not None and req.speculate:
            req.stats.draft = self.spec.draft.spec
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request; it leaves the batch at the next step boundary."""
        req.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    # ---- one step ---------------------------------------------------------
    def _remove_finished(self) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.done and not r.cancelled]
        for r in self.rows:
            if r.cancelled and not r.done:
                r.finish_reason = "cancelled"
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (indices into self.rows) in the batch and its caches."""
        if len(keep) == len(self.rows):
            return
        old, self.rows = self.rows, [self.rows[i] for i in keep]
        if not self.rows:
            self._kept = self._keepable(old)
        self.lane.keep_rows(keep)
        if self.drafting is not None:
            self.drafting.keep_rows(keep)

    def _need(self, joining: list[Request]) -> tuple[int, int, int]:
        """(rows, tokens this step, positions the cache reaches before any other joins) if ``joining``
        join the live rows now: what the KV cache and workspace must hold at most."""
        cols = self.lane.width
        step = max((len(r.prompt_ids) + len(r.token_ids) for r in joining), default=1)
        if self.spec is not None:  # a step may verify a tree: its nodes are columns until it is cut back
            step = max(step, 1 + self.spec.max_nodes)
        live = self.rows + joining
        left = max((r.max_new_tokens - len(r.token_ids) - 1 for r in live), default=0)
        return len(live), step, cols + step + max(left, 0)

    def _fits(self, joining: list[Request]) -> bool:
        return self.engine.room_for(*self._need(joining))

    def _keepable(self, rows: list[Request]):
        """A lone sequence's cache, if it can seed the next one: its entries are exactly its positions
        0.._pos-1 in every layer (not so after a step that stopped midway, e.g. on Ctrl-C)."""
        from layerrun.engine.kv_cache import LayerKV

        kp, cache = self.lane.key_pos, self.lane.cache
        if not self.reuse_prefix or len(rows) != 1 or kp is None:
            return None
        r = rows[0]
        if kp.shape[1] != r._pos or not torch.equal(kp[0], torch.arange(r._pos)):
            return None
        if not all(type(layer) is LayerKV and layer.length == r._pos for layer in cache.layers):
            return None  # (a host-memory cache is not reused: its device copies have their own bookkeeping)
        return (r.prompt_ids + r.token_ids)[: r._pos], cache, kp

    def _resume(self, r: Request) -> bool:
        """Start ``r`` from the kept cache when its prompt extends what the cache holds; True if so.
        (A draft's cache is not kept: the draft catches up on the prompt when it first drafts.)"""
        ids, cache, kp = self._kept
        self._kept = None
        n = 0
        limit = min(len(ids), len(r.prompt_ids) - 1)  # at least one prompt token is fed, for the logits
        while n < limit and ids[n] == r.prompt_ids[n]:
            n += 1
        if n == 0:
            return False
        for layer in cache.layers:
            layer.length = n  # entries past the common prefix are overwritten as the new tokens are fed
        self.lane.cache, self.lane.key_pos, self.lane.rows = cache, kp[:, :n], 1
        if self.drafting is not None:
            self.drafting.add_rows(1)
        r._pos, r.reused_prompt_tokens = n, n
        self.rows = [r]
        return True

    def _admit(self) -> tuple[list[Request], set[int], int | None]:
        """Rows joining this step (waiting requests, and rows whose cache must be recomputed), and the
        request resumed from the kept cache, if any."""
        self.waiting = deque(r for r in self.waiting if not r.cancelled or _cancel(r))
        self._remove_finished()
        # A row reaching the position where its family must recompute its cache (Phi-3 LongRoPE
        # switching factors) leaves the batch and rejoins with its whole sequence, as a prefill.
        rerun_at = getattr(self.engine.model, "rerun_prefix_at", None)
        rerun = [r for r in self.rows if rerun_at is not None and r._next is not None and r._pos == rerun_at]
        rerun_ids = {r.id for r in rerun}
        if rerun:
            self._keep_rows([i for i, r in enumerate(self.rows) if r.id not in rerun_ids])
        joined = list(rerun)
        resumed = None
        if self._kept is not None and not self.rows and not joined and len(self.waiting) == 1:
            r = self.waiting[0]
            if self._resume(r):
                self.waiting.popleft()
                r._joined_at = time.perf_counter()
                resumed = r.id
        self._kept = None
        while self.waiting and len(self.rows) + len(joined) < self.max_batch:
            if not self._fits(joined + [self.waiting[0]]):  # the KV cache would outgrow the memory left: wait
                if self.rows or joined:
                    break
                self.engine.make_room(*self._need(joined + [self.waiting[0]]))  # alone: stream layers for it
            r = self.waiting.popleft()
            r._joined_at = time.perf_counter()
            joined.append(r)
        self.lane.add_rows(len(joined))
        if self.drafting is not None:
            self.drafting.add_rows(len(joined))
        self.rows = self.rows + joined
        return joined, rerun_ids, resumed

    def _spec_rows(self, joined: set[int]) -> list[SpecRow]:
        """The live rows that draft this step, with how deep their trees may go."""
        if self.spec is None:
            return []
        model, draft_model = self.engine.model, getattr(self.spec.draft, "engine", None)
        out = []
        for b, r in enumerate(self.rows):
            if r.id in joined or not r.speculate or r._next is None:
                continue
            depth = min(MAX_DEPTH, r.max_new_tokens - len(r.token_ids) - 1)  # the tokens it may still emit
            limit = getattr(model, "max_tree_depth", None)
            if limit is not None and limit(r._pos) is not None:
                depth = min(depth, limit(r._pos))
            if draft_model is not None:
                depth = min(depth, draft_model.args.max_position_embeddings - 1 - r._pos)
            if depth >= 1:
                out.append(SpecRow(b, r.prompt_ids + r.token_ids, depth, self.spec.max_nodes, r.sampling,
                                   getattr(r._sampler, "generator", None)))
        return out

    def step(self) -> list[Event]:
        """Run one forward pass over the live batch (joining waiting requests first)."""
        t0 = time.perf_counter()
        joined, rerun_ids, resumed = self._admit()
        if not self.rows:
            return []
        joined_ids = {r.id for r in joined}
        # ---- drafting
        totals = SpecTotals()
        spec_rows = self._spec_rows(joined_ids)
        trees: dict[int, Tree] = {}
        if spec_rows:
            base = sum(len(r.prompt_ids) + (len(r.token_ids) if r.id in rerun_ids else 0) if r.id in joined_ids else 1
                       for r in self.rows)
            for sr, tree in zip(spec_rows, self.spec.propose(self.drafting, spec_rows, base, totals)):
                trees[sr.b] = tree
        t_draft = time.perf_counter()
        # ---- the target pass
        blocks = []
        for b, r in enumerate(self.rows):
            if r.id in joined_ids:
                blocks.append(_Block(r.prompt_ids + (r.token_ids if r.id in rerun_ids else []), 0))
            elif b in trees and len(trees[b]) > 1:
                blocks.append(_Block(trees[b].tokens, r._pos, trees[b]))
            elif r._next is None:  # resumed from a kept cache: the rest of its prompt
                blocks.append(_Block(r.prompt_ids[r._pos :], r._pos))
            else:
                blocks.append(_Block([r._next], r._pos))
        step_stats = GenerationStats()
        start = self.lane.width
        if any(bl.tree is not None for bl in blocks):
            out = self._tree_pass(blocks, spec_rows, trees, step_stats, start)
        else:
            logits = self.lane.forward(*_block_tensors(blocks)[:2], step_stats)[:, -1]
            tokens, lps = sample_rows(self.rows, logits)
            out = [[(t, lp)] for t, lp in zip(tokens, lps)]
            if trees:  # drafted but nothing worth verifying: the draft's cache keeps what preceded the root
                self.drafting.commit(spec_rows, [trees[sr.b] for sr in spec_rows], [[0] for _ in spec_rows])
        t_end = time.perf_counter()
        if self.spec is not None:
            T = max(len(bl.tokens) for bl in blocks)
            self.spec.target.observe(len(blocks) * T, t_end - t_draft, step_stats.stall_s)
        self.steps += 1
        self.last_stats = step_stats
        self.last_spec = totals
        trace = self.engine.trace
        if totals.draft_s:
            trace.draft(t0, t_draft, {"rows": len(trees), "drafted": totals.draft_tokens,
                                      "forwards": totals.draft_forwards})
        events = []
        dt = t_end - t0  # the whole step as the rows see it: batching, drafting, forward, verification
        accepted = 0
        first = (joined_ids - rerun_ids) | {resumed}
        for b, (r, toks) in enumerate(zip(self.rows, out)):
            tree = blocks[b].tree
            if tree is not None:
                accepted += len(toks) - 1
                trace.verify(t_draft, t_end, {"row": b, "drafted": len(tree) - 1, "accepted": len(toks) - 1})
            _account(r, step_stats, dt, first=r.id in first, tree=tree, accepted=len(toks) - 1,
                     draft_s=totals.draft_s if b in trees else 0.0, verify_s=t_end - t_draft)
            for tok, lp in toks:
                ev = self._advance(r, tok)
                if lp is not None:
                    ev.logprob, ev.top_logprobs = lp
                events.append(ev)
                if r.done:
                    break
        totals.accepted_tokens = accepted
        return events

    def _tree_pass(self, blocks: list[_Block], spec_rows: list[SpecRow], trees: dict[int, Tree],
                   stats: GenerationStats, start: int) -> list[list[tuple[int, tuple | None]]]:
        """The target pass over a block holding token trees; verify each and keep the accepted paths.
        Returns per row the tokens it emits, each with its logprobs (None unless the request asked)."""
        ids, pos, tree_mask = _block_tensors(blocks)
        T = ids.shape[1]
        select, where = [], []
        for b, bl in enumerate(blocks):
            n = len(bl.tokens) if bl.tree is not None else 1
            where.append(len(select))
            select += [b * T + t for t in range(T - n, T)]
        # (N, V) for every row's nodes; verification runs on the CPU (small, branchy, seeded generators)
        logits = self.lane.forward(ids, pos, stats, tree=tree_mask, select=torch.tensor(select, dtype=torch.long)).cpu()
        out, keep, paths = [], [], {}
        by_b = {sr.b: sr for sr in spec_rows}
        plain = [b for b, bl in enumerate(blocks) if bl.tree is None]
        tokens, lps = sample_rows([self.rows[b] for b in plain], logits[[where[b] for b in plain]])
        sampled = {b: (t, lp) for b, t, lp in zip(plain, tokens, lps)}
        for b, (r, bl) in enumerate(zip(self.rows, blocks)):
            n = len(bl.tokens)
            if bl.tree is None:
                out.append([sampled[b]])
                keep.append(list(range(T - n, T)))
                continue
            node_logits = logits[where[b] : where[b] + n]
            path, toks = self.spec.verify(bl.tree, by_b[b], node_logits, r.prompt_ids + r.token_ids, r.processors)
            paths[b] = path
            # the i-th emitted token was chosen at the i-th node of the path
            out.append([(t, _logprobs(node_logits[u], t, r.logprobs)) for t, u in zip(toks, path)])
            keep.append([T - n + j for j in path])
        self.lane.keep_columns(start, keep)
        if trees:
            self.drafting.commit(spec_rows, [trees[sr.b] for sr in spec_rows], [paths.get(sr.b, [0]) for sr in spec_rows])
        return out

    def _advance(self, r: Request, tok: int) -> Event:
        r.stats.generated_tokens += 1
        r._pos = len(r.prompt_ids) if r._next is None else r._pos + 1
        eos = set() if r.ignore_eos else self.engine.eos_token_ids
        if tok in eos:
            return self._finish(r, "stop", None)
        r.token_ids.append(tok)
        r._held += r._decoder.push(tok) if r._decoder else ""
        out, hit = split_stop(r._held, r.stop)
        if hit:
            r.text += out
            r._held = ""
            return self._finish(r, "stop", tok, out)
        r._held = r._held[len(out) :]
        r.text += out
        if len(r.token_ids) >= r.max_new_tokens:
            return self._finish(r, "length", tok, out)
        r._next = tok
        return Event(r, out, tok)

    def _finish(self, r: Request, reason: str, tok: int | None, text: str = "") -> Event:
        if reason != "stop" or not r.stop or r._held:
            # flush what was held back for a possible stop string, and any incomplete UTF-8
            tail = r._held + (r._decoder.flush() if r._decoder else "")
            out, hit = split_stop(tail, r.stop)
            tail = out if hit else tail
            r.text += tail
            text += tail
            r._held = ""
        r.finish_reason = reason
        self.engine._finish_stats(r.stats, since=r._submitted_at)
        return Event(r, text, tok, reason)

    def run(self, on_event: Callable[[Event], None] | None = None) -> None:
        """Step until every request has finished."""
        while self.busy:
            for ev in self.step():
                if on_event:
                    on_event(ev)


def _cancel(r: Request) -> bool:
    r.finish_reason = "cancelled"
    return False


def _block_tensors(blocks: list[_Block]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """ids (B, T), positions (B, T; -1: padding) and, when any row holds a tree, the (B, T, T) tree mask
    of one right-aligned block; a chain's tree mask is causal."""
    B, T = len(blocks), max(len(bl.tokens) for bl in blocks)
    ids = torch.zeros((B, T), dtype=torch.long)
    pos = torch.full((B, T), -1, dtype=torch.long)
    trees = any(bl.tree is not None for bl in blocks)
    mask = torch.zeros((B, T, T), dtype=torch.bool) if trees else None
    for b, bl in enumerate(blocks):
        n = len(bl.tokens)
        ids[b, T - n :] = torch.tensor(bl.tokens)
        if bl.tree is None:
            pos[b, T - n :] = torch.arange(bl.start, bl.start + n)
            if mask is not None:
                mask[b, T - n :, T - n :] = torch.ones((n, n), dtype=torch.bool).tril()
        else:
            pos[b, T - n :] = bl.start + torch.tensor(bl.tree.depth)
            mask[b, T - n :, T - n :] = bl.tree.ancestors()
    return ids, pos, mask


def sample_rows(rows: list[Request], logits: torch.Tensor) -> tuple[list[int], list]:
    """Sample each row with its own sampler; plain greedy rows share one argmax.

    The logits-processor hook: a row with ``processors`` has its logits passed through each
    (``proc(prompt + output so far, logits (V,))``) before its sampler, and each is told the
    chosen token (``proc.accept(tok)``): that is how penalties and grammars (structured output)
    apply, row by row. Logprobs (for rows that ask) come from the model's own distribution,
    before any processor, temperature or filter (as vLLM's default).
    Returns (token per row, per row None or (logprob, [(token, logprob)] top-k)).
    """
    out = [0] * len(rows)
    plain = [i for i, r in enumerate(rows) if r.sampling.temperature == 0 and not r.processors]
    if plain:
        am = logits[plain].argmax(-1).tolist()
        for i, t in zip(plain, am):
            out[i] = t
    for i, r in enumerate(rows):
        if r.processors:
            x = logits[i]
            history = r.prompt_ids + r.token_ids
            for proc in r.processors:
                x = proc(history, x)
            x = x[None]
        elif r.sampling.temperature != 0:
            x = logits[i : i + 1]
        else:
            continue
        out[i] = int(x.argmax(-1)[0]) if r.sampling.temperature == 0 else int(r._sampler(x)[0])
        for proc in r.processors:
            proc.accept(out[i])
    lps: list = [None] * len(rows)
    for i, r in enumerate(rows):
        if r.logprobs is not None:
            lp = torch.log_softmax(logits[i].float(), dim=-1)
            top = torch.topk(lp, r.logprobs) if r.logprobs else None
            lps[i] = (float(lp[out[i]]), list(zip(top.indices.tolist(), top.values.tolist())) if top else [])
    return out, lps


def _logprobs(logits: torch.Tensor, tok: int, k: int | None) -> tuple | None:
    """(logprob of ``tok``, the k most likely (token, logprob)) under the model's own distribution."""
    if k is None:
        return None
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, k) if k else None
    return float(lp[tok]), list(zip(top.indices.tolist(), top.values.tolist())) if top else []


def _account(r: Request, s: GenerationStats, dt: float, first: bool, tree: Tree | None = None, accepted: int = 0,
             draft_s: float = 0.0, verify_s: float = 0.0) -> None:
    st = r.stats
    if first:
        st.prefill_s = dt
    else:
        st.decode_s += dt
    st.passes += 1
    st.draft_s += draft_s
    if tree is not None:
        st.draft_tokens += len(tree) - 1
        st.accepted_tokens += accepted
        st.verify_s += verify_s
    st.bytes_read += s.bytes_read
    st.read_s += s.read_s
    st.compute_s += s.compute_s
    st.stall_s += s.stall_s
    st.steps += s.steps
    st.step_s += s.step_s
    st.read_intervals.extend(s.read_intervals)
    st.copy_s += s.copy_s
    for i, v in s.layer_compute_s.items():
        st.layer_compute_s[i] = st.layer_compute_s.get(i, 0.0) + v
    st.experts_read += s.experts_read
    st.experts_total += s.experts_total
    st.expert_bytes_read += s.expert_bytes_read
    st.expert_bytes_skipped += s.expert_bytes_skipped
