"""The engine's memory for sequences: whether more sequences (or longer ones) fit the budget the
governor planned, and what to give up for them.

:class:`EngineMemory` is mixed into :class:`layerrun.engine.engine.Engine`. ``room_for`` answers the
scheduler before it admits a row; ``make_room`` grows the KV cache's reservation by streaming resident
layers the new plan no longer keeps (auto / partial only); ``check_memory`` refuses, with the
figures, a sequence that could not run even alone. Under torchrun each asks the stage, which asks
every rank about its own range.
"""

from __future__ import annotations

from layerrun.errors import LayerRunError


class EngineMemory:
    """Memory for sequences, for :class:`~layerrun.engine.engine.Engine` (a mixin: it uses the engine's
    plan, manifest, args, dtype, stage and resident layers)."""

    def _sequences_need(self, rows: int, step_tokens: int, keys: int) -> int:
        from layerrun.engine.governor import sequences_need

        return sequences_need(self.args, rows, step_tokens, keys, self.dtype.itemsize)

    def room_for(self, rows: int, step_tokens: int, keys: int) -> bool:
        """Whether ``rows`` sequences whose cache reaches ``keys`` positions, in a step of ``step_tokens``
        tokens, fit in the memory the weights leave (the governor's ``plan.room``). A mode the caller
        forced to ``full`` is not held to the budget (it was warned about at load)."""
        if self._mode_asked == "full":
            return True
        if self.stage is not None:  # torchrun: every stage's own range against its own room
            return self.stage.room_for(self, rows, step_tokens, keys)
        return self._sequences_need(rows, step_tokens, keys) <= self.plan.room

    def make_room(self, rows: int, step_tokens: int, keys: int) -> None:
        """Grow the KV cache's reservation for a sequence that does not fit as the engine stands: plan
        again with it (the budget measured at load) and stream the resident layers the new plan no
        longer keeps. Only where the mode was left to the governor (auto, partial). Under torchrun every
        stage does so for its own range (rank 0 asks the others: :meth:`Stage.make_room`)."""
        if self.stage is not None:
            self.stage.make_room(self, rows, step_tokens, keys)
        else:
            self.demote_for(rows, step_tokens, keys)

    def demote_for(self, rows: int, step_tokens: int, keys: int) -> None:
        """This process's part of :meth:`make_room` (under torchrun: this rank's range)."""
        from layerrun.engine.governor import fmt, plan_memory

        if self.stage is not None and self.stage.shrink_ring(self, rows, keys):
            return
        if self._mode_asked not in ("auto", "partial") or not self.plan.resident or self._dense:
            return
        planner = self.stage.plan_memory if self.stage is not None else plan_memory
        try:
            new = planner(self.manifest, self.args, mode=self._mode_asked, batch=rows, context=keys,
                          budget=self.plan.budget, baseline=self.plan.baseline, **self._plan_kw)
        except LayerRunError:
            new = None
        old = self.plan.resident
        k = min(len(new.resident), len(old)) if new is not None else 0
        if k == len(old):
            return
        for i in old[k:]:
            self._resident.pop(i, None)
        streamed = sorted(old[k:] + self.plan.streamed)
        need = (self._sequences_need(rows, step_tokens, keys) if self.stage is None
                else self.stage.need(self, self.stage.rank, rows, step_tokens, keys))
        line = (f"the KV cache grew to {rows} x {keys} tokens ({fmt(need)} with workspace): layers {old[k]}..{old[-1]} "
                f"are streamed from now on, {k} of {len(old) + len(self.plan.streamed)} stay resident")
        base = new if new is not None else self.plan
        self.plan = type(base)(
            "partial" if k else "stream", old[:k], streamed, base.prefetch, base.kv_location,
            base.budget, base.need, base.lines + [line], baseline=base.baseline, reserve=(rows, keys),
            reserved=base.reserved)
        self.mode = self.plan.mode
        self.notes.append(line)
        self._open_stream()

    def check_memory(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse a sequence that could not run alone even with every layer streamed, naming the figures."""
        from layerrun.engine.governor import fmt, plan_memory

        keys = prompt_tokens + max_new_tokens
        if self._mode_asked == "full" or self.room_for(1, prompt_tokens, keys):
            return
        if self.stage is not None:  # torchrun: each stage's range against what its rank could make room for
            return self.stage.check_memory(self, prompt_tokens, max_new_tokens)
        mode = "stream" if self._mode_asked == "stream" else "auto"
        try:
            bare = plan_memory(self.manifest, self.args, mode="stream", batch=1, context=1, budget=self.plan.budget,
                               baseline=self.plan.baseline, **{**self._plan_kw, "prefetch": self.plan.prefetch})
        except LayerRunError:
            return  # not even one token: loading would have refused; nothing better to say here
        # auto/partial: every resident layer could be streamed for it (make_room); else the plan stands
        room = bare.room if mode == "auto" and not self._dense else self.plan.room
        need = self._sequences_need(1, prompt_tokens, keys)
        if need <= room:
            return
        what = would_fit(lambda n: self._sequences_need(1, prompt_tokens, n), prompt_tokens, keys, room)
        raise LayerRunError(
            f"this request needs {fmt(need)} of KV cache and workspace ({prompt_tokens} prompt tokens + up to "
            f"{max_new_tokens} new); the memory budget leaves {fmt(room)} for them with "
            f"{'every layer streamed' if mode == 'auto' else 'the layers as planned'}. Would fit: {what}, "
            "or more memory for the process")


def would_fit(need_of, prompt_tokens: int, keys: int, room: int) -> str:
    """What would fit ``room`` instead of a sequence of ``keys`` positions after ``prompt_tokens``: the most
    new tokens whose need (``need_of(positions)``, growing with the length) fits, or a shorter prompt."""
    fit, lo, hi = 0, prompt_tokens + 1, keys
    while lo <= hi:  # the longest sequence that fits
        mid = (lo + hi) // 2
        if need_of(mid) <= room:
            fit, lo = mid, mid + 1
        else:
            hi = mid - 1
    return (f"at most {fit - prompt_tokens} new tokens (max_tokens / --max-new-tokens)" if fit > prompt_tokens
            else "a shorter prompt")
