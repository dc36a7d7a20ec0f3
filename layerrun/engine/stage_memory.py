"""Every stage's KV cache and workspace against its own rank's memory (mixed into
:class:`~layerrun.engine.stages.Stage`).

Rank 0 admits the sequences, the other ranks' caches follow. So rank 0 holds, for every stage, the
room its plan leaves for the KV cache and workspace (``Plan.room``) and the room it would have with
every layer of its range streamed; each rank reports both at attach. A batch may take a sequence when
every stage's range fits its room (:meth:`room_for`); a sequence that does not fit even alone makes
every stage short of room stream some of its resident layers, or shorten a ring deepened past
--prefetch (:meth:`make_room`: a ROOM message round the ring, each rank re-planning its own range, as
one process does for all its layers); one that would not fit even then is refused, naming the stage
(:meth:`check_memory`).
"""

from __future__ import annotations

import torch

from layerrun.engine.stage_parts import HEADER, ROOM, _StageArgs
from layerrun.errors import LayerRunError


class StageMemory:
    rooms: list[tuple[int, int]]  # per stage: (room now, room with every layer streamed); rank 0's own is live

    def need(self, engine, r: int, rows: int, step_tokens: int, keys: int) -> int:
        """KV cache and workspace of stage ``r``'s layers for ``rows`` sequences reaching ``keys`` positions."""
        from layerrun.engine.governor import sequences_need

        return sequences_need(_StageArgs(engine.args, len(self.ranges[r])), rows, step_tokens, keys,
                              engine.dtype.itemsize)

    def own_rooms(self, engine) -> tuple[int, int]:
        """This rank's (room now, room with its whole range streamed through the ring asked for: what
        :meth:`make_room` can reach)."""
        plan = engine.plan
        asked = engine._plan_kw["prefetch"]
        if engine._dense or not (plan.prefetch > asked or plan.resident and engine._mode_asked in ("auto", "partial")):
            return plan.room, plan.room
        try:
            bare = self.plan_memory(engine.manifest, engine.args, deepen=False, mode="stream", batch=1, context=1,
                                    budget=plan.budget, baseline=plan.baseline,
                                    **engine._plan_kw)  # the ring make_room's plans have
        except LayerRunError:
            return plan.room, plan.room
        return plan.room, max(plan.room, bare.room)

    def _room(self, engine, r: int, bare: bool = False) -> int:
        if r == self.rank:
            return self.own_rooms(engine)[1] if bare else engine.plan.room
        return self.rooms[r][1 if bare else 0]

    def room_for(self, engine, rows: int, step_tokens: int, keys: int) -> bool:
        """Rank 0: whether every stage's range fits its room (:meth:`Engine.room_for`)."""
        return all(self.need(engine, r, rows, step_tokens, keys) <= self._room(engine, r) for r in range(self.world))

    def make_room(self, engine, rows: int, step_tokens: int, keys: int) -> None:
        """Rank 0: every stage short of room streams resident layers for a sequence that does not fit alone
        (:meth:`Engine.make_room`); the others learn of it by a ROOM message and answer with their rooms."""
        short = [r for r in range(self.world) if self.need(engine, r, rows, step_tokens, keys) > self._room(engine, r)]
        if not short:
            return
        if self.rank in short:
            engine.demote_for(rows, step_tokens, keys)
        if short == [self.rank]:
            return
        hdr = torch.zeros(HEADER, dtype=torch.long)
        hdr[0], hdr[1], hdr[2], hdr[3] = ROOM, rows, step_tokens, keys
        with self._lock:
            self.check()
            hdr, payload = self._round_trip(hdr, torch.empty(0, dtype=torch.uint8))
        got = payload.view(torch.long).view(-1, 2).tolist() if payload.numel() else []
        if len(got) != self.world - 1:
            raise RuntimeError(f"a ROOM message came back with {len(got)} stages' rooms, not {self.world - 1}")
        self.rooms = [self.rooms[0], *[(int(a), int(b)) for a, b in got]]

    def shrink_ring(self, engine, rows: int, keys: int) -> bool:
        """This rank streams its whole range through a ring deepened past --prefetch (:meth:`plan_memory`):
        make room for a longer KV cache by a shallower ring (as deep as the new reservation leaves room
        for); True if it did."""
        from layerrun.engine.governor import fmt

        plan = engine.plan
        if plan.resident or plan.prefetch <= engine._plan_kw["prefetch"]:
            return False
        try:
            new = self.plan_memory(engine.manifest, engine.args, mode=engine._mode_asked, batch=rows, context=keys,
                                   budget=plan.budget, baseline=plan.baseline, **engine._plan_kw)
        except LayerRunError:
            return False
        if new.resident or new.prefetch >= plan.prefetch:
            return False
        line = (f"the KV cache grew to {rows} x {keys} tokens: prefetch lowered from {plan.prefetch} to "
                f"{new.prefetch} ({fmt(new.room)} left for the cache and workspace)")
        new.lines.append(line)
        engine.plan, engine.mode = new, new.mode
        engine.notes.append(line)
        engine._open_stream()
        return True

    def answer_room(self, engine, hdr, payload) -> torch.Tensor:
        """The other ranks, on a ROOM message: make room here if this range needs it, add this rank's rooms."""
        rows, step_tokens, keys = int(hdr[1]), int(hdr[2]), int(hdr[3])
        if self.need(engine, self.rank, rows, step_tokens, keys) > engine.plan.room:
            engine.demote_for(rows, step_tokens, keys)
        return torch.cat([payload, torch.tensor(self.own_rooms(engine), dtype=torch.long).view(torch.uint8)])

    def check_memory(self, engine, prompt_tokens: int, max_new_tokens: int) -> None:
        """Rank 0: refuse a sequence some stage could not hold even alone with every layer of its range
        streamed (:meth:`Engine.check_memory`), naming the stage and the longest sequence that fits."""
        from layerrun.engine.engine_memory import would_fit
        from layerrun.engine.governor import fmt

        keys = prompt_tokens + max_new_tokens
        for r in range(self.world):
            room = self._room(engine, r, bare=True)
            need = self.need(engine, r, 1, prompt_tokens, keys)
            if need <= room:
                continue
            what = would_fit(lambda n, r=r: self.need(engine, r, 1, prompt_tokens, n), prompt_tokens, keys, room)
            raise LayerRunError(
                f"this request needs {fmt(need)} of KV cache and workspace in {self.describe(r)} ({prompt_tokens} "
                f"prompt tokens + up to {max_new_tokens} new); that rank's memory budget leaves {fmt(room)} for them. "
                f"Would fit: {what}, or more memory for that rank (its --max-memory), or fewer layers on it (--stages)")
