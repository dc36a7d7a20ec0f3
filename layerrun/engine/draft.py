"""Draft sources for speculative decoding (:mod:`layerrun.engine.speculative`).

- :class:`ModelDraft`: a smaller model with the same tokenizer (a sibling such as a 1B for a
  70B, or an int8/int4 copy of the target itself), kept resident (full mode) on the compute
  device. It has its own KV cache for the live batch (a :class:`~layerrun.engine.lane.Lane`, row
  for row in step with the target's); each round of a tree feeds the round's new nodes as one
  tree-attention block, and after verification its cache too keeps only the accepted path.
- :class:`NgramDraft`: prompt lookup: the longest recent n-gram of the sequence that occurred
  before proposes what followed it there (several occurrences make a tree). No model, no cost.

Each keeps its per-batch state in a session (``draft.session()``), which the generation loop
keeps row for row in step with its own batch.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from layerrun.engine.lane import Lane
from layerrun.engine.speculative import MAX_CHILDREN, Children, LinearCost, SpecRow, Tree, children_from_logits
from layerrun.engine.telemetry import GenerationStats
from layerrun.errors import FormatError, LayerRunError
from layerrun.formats.quant import FUSED_MAX_ROWS

NGRAM_MAX = 4  # longest n-gram looked up
NGRAM_MIN = 1
NGRAM_MATCHES = 8  # most recent occurrences whose continuations make the tree
# A draft forward's matmuls are tiny (at most 16 rows): on a CPU one intra-op thread runs them as fast as
# several, and far faster when the machine is busy (a 4-token SmolLM2-int4 forward on 2 shared cores:
# 45 ms with 1 thread, 350-430 ms with 2, bench/RESULTS.md).
DRAFT_THREADS = 1


def open_draft(spec, target):
    """The draft source ``spec`` names for ``target``: "ngram", or a layered model folder or store name."""
    if spec is None:
        return None
    if isinstance(spec, (ModelDraft, NgramDraft)):
        return spec
    if str(spec) == "ngram":
        return NgramDraft()
    return ModelDraft(spec, target)


class ModelDraft:
    """A resident draft model (full mode, the target's device) with the target's tokenizer."""

    def __init__(self, path: str | Path, target):
        self.spec = str(path)
        try:
            self.engine = type(target)(
                path, mode="full", device=target.device.type, context=target.context, batch_size=target.batch_size,
                threads=target.threads, fast=target.fast, verify=target.verifier is not None,
            )
        except LayerRunError as e:
            raise type(e)(f"--draft {path}: {e}") from None
        self.cost = LinearCost()  # seconds per draft forward over n tokens
        self.vocab = target.args.vocab_size

    def describe(self) -> str:
        e = self.engine
        q = e.manifest.quantization
        kind = f", {q.get('method', 'quantized')}" if q else ""
        return f"{e.path.name} ({e.args.model_type}, {e.manifest.num_layers} layers{kind}, resident on {e.device})"

    def check_tokenizer(self, target) -> None:
        """The draft must spell every token id as the target does: vocabulary size and token strings."""
        check_same_vocab(self.spec, self.engine, target)

    def session(self) -> ModelDraftSession:
        return ModelDraftSession(self)

    def adapt(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits over the target's vocabulary (ids past the tokenizer may differ in number)."""
        V = self.vocab
        if logits.shape[-1] == V:
            return logits
        if logits.shape[-1] > V:
            return logits[..., :V]
        pad = logits.new_full((*logits.shape[:-1], V - logits.shape[-1]), float("-inf"))
        return torch.cat([logits, pad], dim=-1)

    def close(self) -> None:
        self.engine.close()


def check_same_vocab(spec: str, draft_engine, target) -> None:
    if draft_engine.has_tokenizer and target.has_tokenizer:
        mine, theirs = draft_engine.tokenizer.vocab(), target.tokenizer.vocab()
        if mine == theirs:
            return
        if len(mine) != len(theirs):
            why = f"{len(mine)} tokens, the model has {len(theirs)}"
        else:
            by_id = {i: s for s, i in theirs.items()}
            i, s = min(((i, s) for s, i in mine.items() if by_id.get(i) != s), default=(None, None))
            why = f"token {i} is {s!r} there, {by_id.get(i)!r} in the model" if i is not None else "different token ids"
    elif not draft_engine.has_tokenizer and not target.has_tokenizer:
        if draft_engine.args.vocab_size == target.args.vocab_size:
            return
        why = f"vocab_size {draft_engine.args.vocab_size}, the model's is {target.args.vocab_size}"
    else:
        why = "one of the two has no tokenizer.json to compare"
    raise FormatError(f"--draft {spec}: its tokenizer differs from the model's ({why}); a draft must use the same tokenizer")


class ModelDraftSession:
    """A model draft's KV cache and per-row progress for one batch generator."""

    def __init__(self, draft: ModelDraft):
        self.draft = draft
        self.lane = Lane(draft.engine)
        self.done: list[int] = []  # per row: tokens of its sequence in the draft's cache
        self.forwards = 0
        self.region = 0  # first lane column of this step's drafting
        self.cols: list[dict[int, int]] = []  # per drafting row: tree node -> lane column it was fed at
        self.pending: dict[int, list[int]] = {}  # row -> this step's first block's columns (relative to region)
        self.active = False  # drafted this step (start ran): commit has columns to keep

    @property
    def rows(self) -> int:
        return self.lane.rows

    def add_rows(self, n: int) -> None:
        self.lane.add_rows(n)
        self.done += [0] * n

    def keep_rows(self, keep: list[int]) -> None:
        self.lane.keep_rows(keep)
        self.done = [self.done[i] for i in keep]

    def pending_tokens(self, r: SpecRow) -> int:
        return len(r.seq) - self.done[r.b]

    def cost(self, per_row: list[int]) -> float:
        """Predicted seconds of one draft forward feeding ``per_row`` tokens to each drafting row."""
        return self.draft.cost(self.lane.rows * max(per_row, default=0)) if per_row else 0.0

    def _forward(self, feeds: dict[int, tuple[list[int], list[int]]], trees=None,
                 last_only: bool = False) -> dict[int, torch.Tensor]:
        """One draft forward: row b gets tokens feeds[b][0] at positions feeds[b][1]; others padding.
        Returns each fed row's logits (n, V) (``last_only``: (1, V)), over the target's vocabulary."""
        t0 = time.perf_counter()
        B, T = self.lane.rows, max(len(t) for t, _ in feeds.values())
        ids = torch.zeros((B, T), dtype=torch.long)
        pos = torch.full((B, T), -1, dtype=torch.long)
        sel = []
        for b, (toks, ps) in sorted(feeds.items()):
            n = len(toks)
            ids[b, T - n :] = torch.tensor(toks)
            pos[b, T - n :] = torch.tensor(ps)
            sel += [b * T + t for t in range(T - (1 if last_only else n), T)]
        select = torch.tensor(sel, dtype=torch.long)
        tree = trees(T) if trees is not None else None
        threads = torch.get_num_threads()
        cpu = self.draft.engine.device.type == "cpu" and threads != DRAFT_THREADS  # --threads 1: nothing to switch
        if cpu:
            torch.set_num_threads(DRAFT_THREADS)
        try:
            logits = self.draft.adapt(self.lane.forward(ids, pos, GenerationStats(), tree=tree, select=select)).cpu()
        finally:
            if cpu:
                torch.set_num_threads(threads)
        out, k = {}, 0
        for b, (toks, _) in sorted(feeds.items()):
            n = 1 if last_only else len(toks)
            out[b] = logits[k : k + n]
            k += n
        self.forwards += 1
        self.draft.cost.observe(B * T, time.perf_counter() - t0)
        return out

    def _catch_up(self, rows: list[SpecRow], keep: int) -> None:
        """Feed what the draft's cache lacks, but each row's last ``keep`` tokens, in blocks of ``keep``
        (a quantized draft's fused kernels take at most FUSED_MAX_ROWS rows; a long block, such as a
        prompt, would dequantize every weight instead: many times slower on a CPU)."""
        while True:
            feeds = {}
            for r in rows:
                n = min(keep, len(r.seq) - keep - self.done[r.b])
                if n > 0:
                    d = self.done[r.b]
                    feeds[r.b] = (r.seq[d : d + n], list(range(d, d + n)))
            if not feeds:
                return
            self._forward(feeds, last_only=True)
            for b, (toks, _) in feeds.items():
                self.done[b] += len(toks)

    def start(self, rows: list[SpecRow]) -> list[Children]:
        """Feed each drafting row what its draft cache lacks (ending with the root); the root's children."""
        e = self.draft.engine
        if e.manifest.quantization and e.device.type == "cpu":
            self._catch_up(rows, max(1, FUSED_MAX_ROWS // self.lane.rows))
        self.region = self.lane.width
        self.active = True
        feeds = {r.b: (r.seq[self.done[r.b] :], list(range(self.done[r.b], len(r.seq)))) for r in rows}
        T = max(len(t) for t, _ in feeds.values())
        logits = self._forward(feeds)
        self.cols, self.pending = [], {}
        out = []
        for r in rows:
            self.pending[r.b] = list(range(T - len(feeds[r.b][0]), T))
            self.cols.append({0: self.region + T - 1})
            out.append(children_from_logits(logits[r.b][-1], r, MAX_CHILDREN))
        return out

    def expand(self, rows: list[SpecRow], trees: list[Tree], items: list[tuple[int, int]]) -> list[Children]:
        """Feed the nodes ``items`` ((drafting row, node), in order) as one tree-attention block;
        each node's children."""
        by_row: dict[int, list[int]] = {}
        for k, x in items:
            by_row.setdefault(k, []).append(x)
        feeds = {}
        for k, nodes in by_row.items():
            r, tr = rows[k], trees[k]
            feeds[r.b] = ([tr.tokens[x] for x in nodes], [r.pos + tr.depth[x] for x in nodes])
        start = self.lane.width

        def tree_mask(T: int) -> torch.Tensor:
            R = start - self.region + T
            m = torch.zeros((self.lane.rows, T, R), dtype=torch.bool)
            for k, nodes in by_row.items():
                b, tr, cols = rows[k].b, trees[k], self.cols[k]
                off = T - len(nodes)
                for t, x in enumerate(nodes):
                    cols[x] = start + off + t
                for t, x in enumerate(nodes):
                    row = m[b, off + t]
                    row[self.pending[b]] = True  # what preceded the root (and the root itself)
                    a = x
                    while a > 0:
                        row[cols[a] - self.region] = True
                        a = tr.parents[a]
            return m

        logits = self._forward(feeds, tree_mask)
        seen: dict[int, int] = {}
        out = []
        for k, _x in items:
            j = seen.get(k, 0)
            seen[k] = j + 1
            out.append(children_from_logits(logits[rows[k].b][j], rows[k], MAX_CHILDREN))
        return out

    def commit(self, rows: list[SpecRow], trees: list[Tree], paths: list[list[int]]) -> None:
        """Keep in the draft's cache only what each row accepted (and what preceded the root)."""
        if not self.active:
            return
        self.active = False
        keep: list[list[int]] = [[] for _ in range(self.lane.rows)]
        for k, r in enumerate(rows):
            fed = [x for x in paths[k][1:] if x in self.cols[k]]
            keep[r.b] = self.pending[r.b] + [self.cols[k][x] - self.region for x in fed]
            self.done[r.b] = len(r.seq) + len(fed)
        self.lane.keep_columns(self.region, keep)


class NgramDraft:
    """Prompt lookup: continuations of earlier occurrences of the sequence's last n tokens."""

    cost = None
    spec = "ngram"

    def describe(self) -> str:
        return f"n-gram lookup (the prompt and the text so far; n = {NGRAM_MAX}..{NGRAM_MIN}, no model)"

    def check_tokenizer(self, target) -> None:
        return None

    def session(self) -> NgramSession:
        return NgramSession()

    def close(self) -> None:
        return None


class NgramSession:
    """Per row: an index of every n-gram's end positions, kept up to date as the sequence grows."""

    forwards = 0

    def __init__(self):
        self.index: list[dict[tuple, list[int]]] = []
        self.indexed: list[int] = []
        self.tries: list[dict[tuple, Children]] = []

    @property
    def rows(self) -> int:
        return len(self.index)

    def add_rows(self, n: int) -> None:
        self.index += [{} for _ in range(n)]
        self.indexed += [0] * n

    def keep_rows(self, keep: list[int]) -> None:
        self.index = [self.index[i] for i in keep]
        self.indexed = [self.indexed[i] for i in keep]

    def pending_tokens(self, r: SpecRow) -> int:
        return 0

    def cost(self, per_row: list[int]) -> float:
        return 0.0

    def _update(self, b: int, seq: list[int]) -> None:
        idx = self.index[b]
        for i in range(self.indexed[b], len(seq)):
            for n in range(1, NGRAM_MAX + 1):
                if i - n + 1 >= 0:
                    idx.setdefault(tuple(seq[i - n + 1 : i + 1]), []).append(i)
        self.indexed[b] = len(seq)

    def _trie(self, r: SpecRow) -> dict[tuple, Children]:
        """Continuations of the longest n-gram ending the sequence that occurred before, as a trie:
        path of tokens -> its children (by how many occurrences continue that way)."""
        seq = r.seq
        self._update(r.b, seq)
        last = len(seq) - 1
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if n > len(seq):
                continue
            ends = [e for e in self.index[r.b].get(tuple(seq[-n:]), []) if e < last]
            if ends:
                break
        else:
            return {}
        conts = [seq[e + 1 : e + 1 + r.max_depth] for e in ends[-NGRAM_MATCHES:][::-1]]  # most recent first
        counts: dict[tuple, dict[int, int]] = {}
        for c in conts:
            for d in range(len(c)):
                nxt = counts.setdefault(tuple(c[:d]), {})
                nxt[c[d]] = nxt.get(c[d], 0) + 1
        trie = {}
        for prefix, nxt in counts.items():
            total = sum(nxt.values())
            ranked = sorted(nxt.items(), key=lambda kv: -kv[1])[:MAX_CHILDREN]
            f = [c / total for _, c in ranked]
            trie[prefix] = Children([t for t, _ in ranked], f, f)
        return trie

    def start(self, rows: list[SpecRow]) -> list[Children]:
        self.tries = [self._trie(r) for r in rows]
        return [t.get((), Children([], [], [])) for t in self.tries]

    def expand(self, rows: list[SpecRow], trees: list[Tree], items: list[tuple[int, int]]) -> list[Children]:
        out = []
        for k, x in items:
            tr, path = trees[k], []
            while x > 0:
                path.append(tr.tokens[x])
                x = tr.parents[x]
            out.append(self.tries[k].get(tuple(path[::-1]), Children([], [], [])))
        return out

    def commit(self, rows: list[SpecRow], trees: list[Tree], paths: list[list[int]]) -> None:
        return None
