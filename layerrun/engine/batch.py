"""Batched generation: one layer load serves many sequences.

In stream mode every decode step reads the whole model, so tokens/s past the
disk's limit come only from running many sequences through each layer while it
is loaded. :class:`BatchGenerator` keeps a live batch of up to ``max_batch``
sequences; at every step boundary finished sequences leave and waiting ones
join (continuous batching).

Layout: every row is right-aligned, so each row's newest token is in the last
column. A step feeds live rows their last sampled token and joining rows their
whole prompt, left-padded to the longest; ``key_pos`` (B, S) holds each cached
key's token position, -1 for padding, which gives both the attention mask and
sliding windows measured in tokens even across padding gaps.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from layerrun.engine.kv_cache import layer_add_rows, layer_drop_prefix, layer_select_rows
from layerrun.engine.sampling import SamplingParams
from layerrun.engine.telemetry import GenerationStats
from layerrun.engine.tokenizer import StreamDecoder
from layerrun.errors import LayerRunError

COMPACT_AT = 64  # drop leading all-padding cache columns once there are this many
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
    """What one step produced for one request: new text, the token, and whether it finished."""

    request: Request
    text: str
    token_id: int | None
    finish_reason: str | None = None
    logprob: float | None = None  # of token_id under the model's distribution (when the request asked)
    top_logprobs: list[tuple[int, float]] | None = None


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
        self.cache = engine.new_cache()
        self.key_pos: torch.Tensor | None = None  # (B, S) int64, -1 = padding
        self.steps = 0
        self.last_stats: GenerationStats | None = None  # the latest step's figures (bytes read, stall); the server reads them

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
        **options,
    ) -> Request:
        """Build and check a request (raises LayerRunError on bad input) and queue it.

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
                      logprobs=extra.logprobs)
        req._sampler = sampler
        req._decoder = StreamDecoder(eng.tokenizer) if eng.has_tokenizer else None
        req.stats = eng._new_stats(len(ids))
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
        """Keep only rows ``keep`` (indices into self.rows) in the batch and its cache."""
        if len(keep) == len(self.rows):
            return
        old, self.rows = self.rows, [self.rows[i] for i in keep]
        if not self.rows:
            self._kept = self._keepable(old)
            self.cache = self.engine.new_cache()
            self.key_pos = None
            return
        idx = torch.tensor(keep, dtype=torch.long)
        for layer in self.cache.layers:
            layer_select_rows(layer, idx)
        self.key_pos = self.key_pos.index_select(0, idx)
        used = (self.key_pos >= 0).any(0).nonzero()
        first = int(used[0]) if len(used) else self.key_pos.shape[1]
        if first >= COMPACT_AT:
            for layer in self.cache.layers:
                layer_drop_prefix(layer, first)
            self.key_pos = self.key_pos[:, first:]

    def _need(self, joining: list[Request]) -> tuple[int, int, int]:
        """(rows, tokens this step, positions the cache reaches before any other joins) if ``joining``
        join the live rows now: what the KV cache and workspace must hold at most."""
        cols = self.key_pos.shape[1] if self.key_pos is not None else 0
        step = max((len(r.prompt_ids) + len(r.token_ids) for r in joining), default=1)
        live = self.rows + joining
        left = max((r.max_new_tokens - len(r.token_ids) - 1 for r in live), default=0)
        return len(live), step, cols + step + max(left, 0)

    def _fits(self, joining: list[Request]) -> bool:
        return self.engine.room_for(*self._need(joining))
    def _keepable(self, rows: list[Request]):
        """A lone sequence's cache, if it can seed the next one: its entries are exactly its positions
        0.._pos-1 in every layer (not so after a step that stopped midway, e.g. on Ctrl-C)."""
        from layerrun.engine.kv_cache import LayerKV

        if not self.reuse_prefix or len(rows) != 1 or self.key_pos is None:
            return None
        r, kp = rows[0], self.key_pos
        if kp.shape[1] != r._pos or not torch.equal(kp[0], torch.arange(r._pos)):
            return None
        if not all(type(layer) is LayerKV and layer.length == r._pos for layer in self.cache.layers):
            return None  # (a host-memory cache is not reused: its device copies have their own bookkeeping)
        return (r.prompt_ids + r.token_ids)[: r._pos], self.cache, kp

    def _resume(self, r: Request) -> bool:
        """Start ``r`` from the kept cache when its prompt extends what the cache holds; True if so."""
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
        self.cache, self.key_pos = cache, kp[:, :n]
        r._pos, r.reused_prompt_tokens = n, n
        self.rows = [r]
        return True

    def step(self) -> list[Event]:
        """Run one forward pass over the live batch (joining waiting requests first)."""
        t0 = time.perf_counter()
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
        if not self.rows and not joined:
            return []
        # live rows feed their last token; a resumed row the rest of its prompt; joining rows everything
        feeds = [[r._next] if r._next is not None else r.prompt_ids[r._pos :] for r in self.rows] + [
            r.prompt_ids + (r.token_ids if r.id in rerun_ids else []) for r in joined]
        starts = [r._pos for r in self.rows] + [0] * len(joined)
        B, T = len(feeds), max(len(f) for f in feeds)
        ids = torch.zeros((B, T), dtype=torch.long)
        pos = torch.full((B, T), -1, dtype=torch.long)
        for b, (f, s) in enumerate(zip(feeds, starts)):
            ids[b, T - len(f) :] = torch.tensor(f)
            pos[b, T - len(f) :] = torch.arange(s, s + len(f))
        if joined:
            for layer in self.cache.layers:
                layer_add_rows(layer, len(joined))
            if self.key_pos is not None:
                pad = torch.full((len(joined), self.key_pos.shape[1]), -1, dtype=torch.long)
                self.key_pos = torch.cat([self.key_pos, pad])
        self.key_pos = pos.clone() if self.key_pos is None else torch.cat([self.key_pos, pos], dim=1)
        self.rows = self.rows + joined
        key_valid = None if bool((self.key_pos >= 0).all()) else self.key_pos
        step_stats = GenerationStats()
        logits = self.engine._forward(ids, self.cache, pos.clamp(min=0), key_valid, step_stats, last_only=True)
        self.steps += 1
        self.last_stats = step_stats
        events = []
        tokens, logprobs = sample_rows(self.rows, logits[:, -1])
        dt = time.perf_counter() - t0  # the whole step as the rows see it: batching, forward, sampling
        joined_ids = {r.id for r in joined} | {resumed}
        for r, tok, lp in zip(self.rows, tokens, logprobs):
            _account(r, step_stats, dt, first=r.id in joined_ids and r.id not in rerun_ids)
            ev = self._advance(r, tok)
            if lp is not None:
                ev.logprob, ev.top_logprobs = lp
            events.append(ev)
        return events

    def _advance(self, r: Request, tok: int) -> Event:
        r.stats.generated_tokens += 1
        r._pos = len(r.prompt_ids) if r._next is None else r._pos + 1
        eos = set() if r.ignore_eos else self.engine.eos_token_ids
        if tok in eos:
            return self._finish(r, "stop", None)
        r.token_ids.append(tok)
        r._held += r._decoder.push(tok) if r._decoder else ""
        from layerrun.engine.engine import _split_stop

        out, hit = _split_stop(r._held, r.stop)
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
            from layerrun.engine.engine import _split_stop

            out, hit = _split_stop(tail, r.stop)
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


def _account(r: Request, s: GenerationStats, dt: float, first: bool) -> None:
    st = r.stats
    if first:
        st.prefill_s = dt
    else:
        st.decode_s += dt
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
