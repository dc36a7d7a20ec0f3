"""Speculative decoding: token trees drafted cheaply, verified by the target in the pass it makes anyway.

In stream mode a target pass costs a read of every streamed layer, whatever the number of tokens
in it; a draft (:mod:`layerrun.engine.draft`: a small resident model, an int4 copy of the target,
or n-gram lookup) proposes a tree of likely continuations and the target computes all of them in
that one pass (a tree attention mask, positions by depth: :mod:`layerrun.models.base`). The
longest accepted path and one more token sampled by the target come out of every pass.

Exactness. Greedy rows follow the target's argmax from the root and stop at the first node whose
argmax is no child: token for token what plain decoding gives. Sampling rows use recursive
rejection sampling over each node's children (SpecInfer / Sequoia): child ``x_i`` is accepted with
probability ``min(1, p_i(x_i) / q_i(x_i))``; on rejection ``p_{i+1} = norm(max(0, p_i - q_i))``,
and when every child is rejected the token is drawn from what is left. This is exact when ``x_i``
is distributed as ``q_i`` given everything before it, so a model draft draws a node's children
*without replacement* from its distribution ``q`` (Gumbel top-k), ``q_i`` being ``q`` without
``x_1 .. x_{i-1}``, renormalised; an n-gram draft's children are point masses. Which children
make it into the tree may depend only on earlier siblings, never on a child's own draw: a
sibling's priority uses its *expected* probability under ``q_i``, and sibling i + 1 becomes a
candidate only once sibling i is in. ``p`` is the target's distribution after temperature, top-k
and top-p (and any per-row logits processor), the one plain sampling draws from.

Sizing (the rule ``--explain`` prints). A tree grows a round at a time: each round adds the
candidates with the highest estimated acceptance probability (the product along the path of
calibrated draft probabilities; calibration maps a draft probability to the acceptance rate
verification actually observed for it), then runs one draft forward over them (a tree-attention
block) to get their children. A round is taken only while what it is expected to add, in
tokens, per second it costs (its draft forward plus the target's extra compute for the added
nodes) exceeds the step's expected tokens per second so far. Costs are measured: the target
pass as ``max(disk read per pass, a + b * tokens)``, the draft forward as ``a + b * tokens``.
A pass streamed from disk costs seconds, so trees grow to the node limit; a resident target
costs milliseconds, so the tree shrinks to a short chain or to nothing (then an occasional probe,
costing at most ``PROBE_SHARE`` of the time since speculation last ran, keeps the estimates current).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from layerrun.engine.sampling import SamplingParams, is_greedy, probabilities

MAX_CHILDREN = 8  # candidate children drafted per node
DEFAULT_MAX_NODES = 64  # drafted tokens per row and pass, at most
MAX_DEPTH = 32  # drafted tokens past the root, at most
PROBE_SHARE = 0.02  # while speculation does not pay, a probe may cost this share of the time since it last ran
CAL_BINS = 10
CAL_PRIOR = 4.0  # pseudo-observations per bin: acceptance = draft probability until measured
CAL_CAP = 2000.0  # observations per bin before old ones are halved (follows drift)


@dataclass
class Tree:
    """One row's token tree: node 0 is the root (the row's last token, not yet in the cache);
    parents come before their children."""

    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    depth: list[int] = field(default_factory=lambda: [0])
    value: list[float] = field(default_factory=lambda: [1.0])  # estimated P(node accepted)
    feature: list[float] = field(default_factory=lambda: [1.0])  # draft probability, for calibration
    children: list[list[int]] = field(default_factory=lambda: [[]])
    dist: dict[int, torch.Tensor] = field(default_factory=dict)  # node -> q its children were drawn from

    @classmethod
    def root(cls, token: int) -> Tree:
        return cls([token])

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, value: float, feature: float) -> int:
        i = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self.value.append(value)
        self.feature.append(feature)
        self.children.append([])
        self.children[parent].append(i)
        return i

    def ancestors(self) -> torch.Tensor:
        """(n, n) bool: [i, j] = node j is node i or one of its ancestors."""
        n = len(self.tokens)
        a = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            a[i] |= a[self.parents[i]]
        return a

    def path_tokens(self, path: list[int]) -> list[int]:
        return [self.tokens[i] for i in path[1:]]


@dataclass
class Children:
    """A node's drafted children, in sibling order: tokens, each one's draft probability under the
    distribution it was drawn from (``feature``), the expectation of that before it is drawn
    (``prio``, what decides whether it joins the tree), and the distribution itself (``dist``;
    None: point masses, as n-gram drafts and greedy rows use)."""

    tokens: list[int]
    feature: list[float]
    prio: list[float]
    dist: torch.Tensor | None = None


@dataclass
class SpecRow:
    """What drafting needs to know about one live row."""

    b: int  # row index in the batch (and in every lane)
    seq: list[int]  # prompt + generated tokens; the last one is the root
    max_depth: int
    max_nodes: int
    params: SamplingParams
    generator: torch.Generator | None

    @property
    def greedy(self) -> bool:
        return is_greedy(self.params)

    @property
    def pos(self) -> int:
        return len(self.seq) - 1


# ---- drafted children from a distribution -------------------------------------------------------


def children_from_logits(logits: torch.Tensor, row: SpecRow, k: int = MAX_CHILDREN) -> Children:
    """A node's children from the draft's logits (V,): the k most likely tokens for a greedy row;
    for a sampling row k draws without replacement (Gumbel top-k) from the draft distribution
    processed like the target's (temperature, top-k, top-p)."""
    if not math.isfinite(float(logits.max())):  # NaN anywhere, or nothing finite
        return Children([], [], [])  # a broken draft proposes nothing (the target decides anyway)
    if row.greedy:
        q = torch.softmax(logits.float(), dim=-1)
        top = torch.topk(q, min(k, q.shape[-1]))
        vals = top.values.tolist()
        return Children(top.indices.tolist(), vals, vals)
    q = probabilities(logits, row.params)
    k = min(k, int((q > 0).sum()))
    u = torch.rand(q.shape, generator=row.generator).clamp_(min=1e-20)
    keys = q.log() - (-u.log()).log()  # log q + Gumbel noise: its top-k is a draw without replacement
    tok = torch.topk(keys, k).indices
    qx = q[tok].double()
    before = torch.cat([qx.new_zeros(1), qx.cumsum(0)[:-1]])  # mass of the earlier siblings
    rest = (1.0 - before).clamp(min=1e-12)
    sq_before = torch.cat([qx.new_zeros(1), (qx * qx).cumsum(0)[:-1]])
    expect = ((q.double() * q.double()).sum() - sq_before).clamp(min=0) / rest**2  # E[q_i(x_i)] before the draw
    return Children(tok.tolist(), (qx / rest).tolist(), expect.tolist(), dist=q)


# ---- verification ---------------------------------------------------------------------------------


def verify_greedy(tree: Tree, argmax: Callable[[int], int]) -> tuple[list[int], int, list[tuple[float, int, bool]]]:
    """Follow the target's argmax (``argmax(node)``) from the root while it is a child.

    Returns (accepted path of nodes from the root, the target's token after it, calibration
    observations (draft probability, rank among siblings, accepted) for every child of the nodes
    on the path)."""
    u, path, seen = 0, [0], []
    while True:
        t = argmax(u)
        nxt = None
        for rank, c in enumerate(tree.children[u]):
            hit = tree.tokens[c] == t
            seen.append((tree.feature[c], rank, hit))
            if hit:
                nxt = c
        if nxt is None:
            return path, t, seen
        path.append(nxt)
        u = nxt


def verify_sampled(
    tree: Tree, probs: Callable[[int], torch.Tensor], generator: torch.Generator | None
) -> tuple[list[int], int, list[tuple[float, int, bool]]]:
    """Recursive rejection sampling over each node's children (see the module docstring).

    ``probs(node)``: the target's distribution (V,) after that node. Returns as verify_greedy,
    observations for the children actually tested."""
    u, path, seen = 0, [0], []
    while True:
        p = p0 = probs(u).double()
        q = tree.dist.get(u)
        q = None if q is None else q.double().clone()
        nxt = None
        for rank, c in enumerate(tree.children[u]):
            x = tree.tokens[c]
            if q is None:
                qi = None
                qx = 1.0
            else:
                qi = q / q.sum()
                qx = float(qi[x])
            r = float(torch.rand((), generator=generator, dtype=torch.float64))
            ok = r * qx < float(p[x])  # accept with probability min(1, p(x) / q(x))
            seen.append((tree.feature[c], rank, ok))
            if ok:
                nxt = c
                break
            if qi is None:
                p = p.index_fill(0, torch.tensor([x]), 0.0)  # p minus the point mass at x, clamped
            else:
                p = (p - qi).clamp(min=0)
                q[x] = 0.0
            total = float(p.sum())
            # p == q_i exactly would have accepted with probability 1: left empty only by round-off
            p = p / total if total > 0 else p0
        if nxt is None:
            bonus = int(torch.multinomial(p.float(), 1, generator=generator))
            return path, bonus, seen
        path.append(nxt)
        u = nxt


# ---- what speculation learns while it runs ----------------------------------------------------------


class Calibration:
    """P(a drafted token is accepted | its rank among its siblings, its draft probability), binned,
    from what verification observed. The draft's first choice is accepted far more often than its
    probability says when the draft resembles the target (an int4 copy: nearly always)."""

    RANKS = 3  # first child, second, the rest

    def __init__(self):
        centers = [(i + 0.5) / CAL_BINS for i in range(CAL_BINS)]
        self.tested = [[CAL_PRIOR] * CAL_BINS for _ in range(self.RANKS)]
        # prior: the first child as likely as its probability says, or one in two; the others as it says
        self.accepted = [[CAL_PRIOR * (max(c, 0.5) if r == 0 else c) for c in centers] for r in range(self.RANKS)]

    @staticmethod
    def _bin(q: float) -> int:
        return min(CAL_BINS - 1, max(0, int(q * CAL_BINS)))

    def __call__(self, q: float, rank: int = 0) -> float:
        r, i = min(rank, self.RANKS - 1), self._bin(q)
        return self.accepted[r][i] / self.tested[r][i]

    def observe(self, q: float, rank: int, accepted: bool) -> None:
        r, i = min(rank, self.RANKS - 1), self._bin(q)
        self.tested[r][i] += 1.0
        self.accepted[r][i] += 1.0 if accepted else 0.0
        if self.tested[r][i] > CAL_CAP:
            self.tested[r][i] /= 2
            self.accepted[r][i] /= 2


class LinearCost:
    """t(n) = a + b * n seconds for n tokens, fitted by exponentially weighted least squares."""

    def __init__(self, decay: float = 0.9):
        self.decay = decay
        self.w = self.sn = self.st = self.snn = self.snt = 0.0

    @property
    def known(self) -> bool:
        return self.w > 0

    def observe(self, n: float, t: float) -> None:
        d = self.decay
        self.w = d * self.w + 1
        self.sn = d * self.sn + n
        self.st = d * self.st + t
        self.snn = d * self.snn + n * n
        self.snt = d * self.snt + n * t

    def coefficients(self) -> tuple[float, float]:
        if not self.w:
            return 0.0, 0.0
        mn, mt = self.sn / self.w, self.st / self.w
        var = self.snn / self.w - mn * mn
        if var > 1e-9 * max(mn * mn, 1.0):
            b = max(0.0, (self.snt / self.w - mn * mt) / var)
        else:  # one size seen so far: half of it fixed, half per token
            b = 0.5 * mt / max(mn, 1.0)
        a = max(0.0, mt - b * mn)
        return a, b

    def __call__(self, n: float) -> float:
        a, b = self.coefficients()
        return a + b * n


class TargetCost:
    """A target pass over n tokens: max(disk reads of one pass, compute a + b * n)."""

    def __init__(self):
        self.compute = LinearCost()
        self.io = 0.0  # seconds of reading per pass, seen on passes that waited for the disk

    def observe(self, n: int, seconds: float, stall: float) -> None:
        self.compute.observe(n, max(seconds - stall, 0.0))
        if stall > 0.1 * seconds:
            self.io = seconds if not self.io else 0.7 * self.io + 0.3 * seconds

    def __call__(self, n: float) -> float:
        return max(self.io, self.compute(n))


@dataclass
class SpecTotals:
    """What speculation did in one step (summed over rows), for the step's figures."""

    draft_tokens: int = 0
    accepted_tokens: int = 0
    draft_s: float = 0.0
    draft_forwards: int = 0


class Speculator:
    """Drafts token trees for the live rows and verifies them; one per engine with a draft, so what it
    learns (acceptance calibration, costs) carries over from call to call."""

    def __init__(self, draft, max_nodes: int | None = None, fixed: bool = False):
        self.draft = draft
        self.max_nodes = int(max_nodes or DEFAULT_MAX_NODES)
        self.fixed = fixed  # always grow trees to max_nodes (tests, benchmarks): no cost rule
        self.calibration = {"greedy": Calibration(), "sampled": Calibration()}
        self.continues = {"greedy": 0.5, "sampled": 0.5}  # P(some child accepted | node reached), EMA
        self.target = TargetCost()
        self.idle_s = 0.0  # target time since speculation last ran (it did not pay)

    def rule(self) -> list[str]:
        """The sizing rule, for ``--explain``."""
        n = f"a fixed {self.max_nodes} nodes per row" if self.fixed else f"at most {self.max_nodes} nodes"
        return [
            f"speculation: draft {self.draft.describe()}; token trees of {n}, depth <= {MAX_DEPTH}",
            "speculation: a tree grows a round at a time (best candidates by calibrated acceptance probability, "
            "then one draft forward for their children) while expected tokens gained / seconds added > the "
            "step's expected tokens/s; seconds from measured costs: target pass = max(disk read per pass, "
            "a + b*tokens), draft forward = a + b*tokens",
        ]

    def figures(self) -> str:
        """The measured costs the rule works from, for ``--stats``."""
        a, b = self.target.compute.coefficients()
        io = f"reads {self.target.io:.3f} s, " if self.target.io else ""
        out = f"target pass {io}compute {a * 1e3:.1f} ms + {b * 1e3:.2f} ms/token"
        cost = getattr(self.draft, "cost", None)
        if cost is not None and cost.known:
            da, db = cost.coefficients()
            out += f"; draft forward {da * 1e3:.1f} ms + {db * 1e3:.2f} ms/token"
        return out

    # ---- drafting -----------------------------------------------------------------------------------
    def propose(self, session, rows: list[SpecRow], base_tokens: int, totals: SpecTotals) -> list[Tree]:
        """Grow one tree per row (see the module docstring); ``base_tokens``: the tokens the target
        pass computes anyway (one per live row, joining prompts)."""
        t0 = time.perf_counter()
        trees = [Tree.root(r.seq[-1]) for r in rows]
        if not self.fixed:
            # Would one round pay at all? While speculation runs, judge by a round's steady cost (the draft
            # catching up on a new prompt is paid once, for every step after it); once it does not pay, an
            # occasional probe, paying what the draft has to catch up on, keeps the estimates current.
            gain = sum(self.continues["greedy" if r.greedy else "sampled"] for r in rows)
            rate = len(rows) / max(self.target(base_tokens), 1e-9)
            feed = [1] * len(rows) if not self.idle_s else [session.pending_tokens(r) for r in rows]
            cost = session.cost(feed) + self.target(base_tokens + len(rows)) - self.target(base_tokens)
            if gain <= rate * cost and (not self.idle_s or cost > PROBE_SHARE * self.idle_s):
                self.idle_s += self.target(base_tokens)
                return trees
        self.idle_s = 0.0
        forwards = session.forwards
        first = session.start(rows)
        kids: list[dict[int, Children]] = [{0: c} for c in first]
        heaps: list[list] = [[] for _ in rows]
        order = itertools.count()
        cal = [self.calibration["greedy" if r.greedy else "sampled"] for r in rows]

        def push(k: int, u: int, i: int) -> None:
            ch = kids[k][u]
            if i < len(ch.tokens):
                heapq.heappush(heaps[k], (-trees[k].value[u] * cal[k](ch.prio[i], i), next(order), u, i))

        for k in range(len(rows)):
            if kids[k][0].dist is not None:
                trees[k].dist[0] = kids[k][0].dist
            push(k, 0, 0)
        width = max(1, min(8, 16 // max(1, session.rows)))  # per row and round; int4 kernels run fused to 16 rows
        expected = float(len(rows))  # tokens this step is expected to give
        n = base_tokens
        feeding = True

        def rate() -> float:
            return expected / (time.perf_counter() - t0 + self.target(n))

        while True:
            # This round's candidates, best first per row. Each pick (once fed) is expected to bring a child
            # worth about value * P(a child is accepted); a row stops picking at a candidate worth less
            # than that, since expanding the picks first finds better nodes (best-first, a round at a time).
            picks = []
            for k, r in enumerate(rows):
                room = min(width, r.max_nodes - (len(trees[k]) - 1))
                ahead = 0.0
                rho = self.continues["greedy" if r.greedy else "sampled"] if feeding else 0.0
                while heaps[k] and room > 0 and -heaps[k][0][0] > ahead:
                    negp, _, u, i = heapq.heappop(heaps[k])
                    if trees[k].depth[u] + 1 > r.max_depth:
                        continue  # its siblings are as deep: none of them joins
                    ch = kids[k][u]
                    value = trees[k].value[u] * cal[k](ch.feature[i], i)
                    picks.append((k, u, i, -negp, value))
                    room -= 1
                    push(k, u, i + 1)  # the next sibling may join only after this one (exact sampling)
                    if trees[k].depth[u] + 2 <= r.max_depth:
                        ahead = max(ahead, value * rho)
            if not picks:
                break
            gain = sum(p[3] for p in picks)
            if not self.fixed and gain <= rate() * (self.target(n + len(picks)) - self.target(n)):
                break
            new = []
            for k, u, i, _, value in picks:
                ch = kids[k][u]
                node = trees[k].add(ch.tokens[i], u, value, ch.feature[i])
                expected += value
                new.append((k, node))
            n += len(picks)
            totals.draft_tokens += len(picks)
            if not feeding:
                continue
            grow = [(k, x) for k, x in new
                    if trees[k].depth[x] < rows[k].max_depth and len(trees[k]) - 1 < rows[k].max_nodes]
            if not grow:
                feeding = False
                continue
            if not self.fixed:
                est = sum(self.continues["greedy" if rows[k].greedy else "sampled"] * trees[k].value[x] for k, x in grow)
                per_row = [sum(1 for kk, _ in grow if kk == k) for k in range(len(rows))]
                cost = session.cost(per_row) + self.target(n + len(grow)) - self.target(n)
                if est <= rate() * cost:
                    feeding = False  # the siblings already drafted may still join; no more forwards
                    continue
            out = session.expand(rows, trees, grow)
            for (k, x), ch in zip(grow, out):
                kids[k][x] = ch
                if ch.dist is not None:
                    trees[k].dist[x] = ch.dist
                push(k, x, 0)
        totals.draft_forwards += session.forwards - forwards
        totals.draft_s += time.perf_counter() - t0
        return trees

    # ---- verification ------------------------------------------------------------------------------
    def verify(self, tree: Tree, row: SpecRow, logits: torch.Tensor, history: list[int] | None = None,
               processors: list | None = None) -> tuple[list[int], list[int]]:
        """(accepted path of nodes, tokens the row emits: the accepted drafts, then the target's own).

        ``logits`` (len(tree), V): the target's logits at every node. ``processors``: the row's logits
        processors (penalties, a grammar: ``proc(history, logits) -> logits`` and ``proc.accept(tok)``),
        applied at each node the walk reaches, with ``history`` (prompt + output so far) plus the path
        to it, and told each token the walk commits, in order: the calls plain decoding would make."""
        mode = "greedy" if row.greedy else "sampled"
        procs = processors or []

        def at(u: int) -> torch.Tensor:
            if not procs:
                return logits[u]
            path, x = [], u
            while x > 0:
                path.append(tree.tokens[x])
                x = tree.parents[x]
            path.reverse()
            if path:  # the walk moved to u: its token was chosen
                for proc in procs:
                    proc.accept(path[-1])
            x = logits[u]
            for proc in procs:
                x = proc(list(history or []) + path, x)
            return x

        if row.greedy and not procs:
            am = logits.argmax(-1).tolist()
            path, bonus, seen = verify_greedy(tree, lambda u: am[u])
        elif row.greedy:
            path, bonus, seen = verify_greedy(tree, lambda u: int(at(u).argmax()))
        else:
            path, bonus, seen = verify_sampled(tree, lambda u: probabilities(at(u), row.params), row.generator)
        for proc in procs:
            proc.accept(bonus)
        cal = self.calibration[mode]
        for f, rank, ok in seen:
            cal.observe(f, rank, ok)
        for u in path:  # did the path continue past each node that had children?
            if tree.children[u]:
                go = 1.0 if u != path[-1] else 0.0
                self.continues[mode] = 0.9 * self.continues[mode] + 0.1 * go
        return path, tree.path_tokens(path) + [bonus]
