"""One model's KV cache for the live batch, in the generation loop's layout.

Every row's tokens are right-aligned in each block of new columns; ``key_pos`` (B, S) holds
each cached key's token position, -1 for padding, which gives both the attention mask and
sliding windows measured in tokens even across padding gaps. A :class:`Lane` appends blocks
(a chain of tokens per row, or a token tree), drops and adds rows as sequences leave and join,
and after a token tree is verified keeps only each row's accepted columns. The target model has
one lane; a draft model has its own, kept row for row in step with it.
"""

from __future__ import annotations

import torch

from layerrun.engine.kv_cache import layer_add_rows, layer_drop_prefix, layer_keep_columns, layer_select_rows

COMPACT_AT = 64  # drop leading all-padding cache columns once there are this many


class Lane:
    def __init__(self, engine):
        self.engine = engine
        self.cache = engine.new_cache()
        self.key_pos: torch.Tensor | None = None  # (B, S) int64, -1 = padding
        self.rows = 0

    @property
    def width(self) -> int:
        return 0 if self.key_pos is None else self.key_pos.shape[1]

    def add_rows(self, n: int) -> None:
        """Append ``n`` empty rows (sequences joining the batch)."""
        if n == 0:
            return
        for layer in self.cache.layers:
            layer_add_rows(layer, n)
        if self.key_pos is not None:
            self.key_pos = torch.cat([self.key_pos, torch.full((n, self.width), -1, dtype=torch.long)])
        self.rows += n

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (indices, in order); drop leading columns no row uses any more."""
        if len(keep) == self.rows:
            return
        self.rows = len(keep)
        if not keep:
            self.cache = self.engine.new_cache()
            self.key_pos = None
            return
        if self.key_pos is None:
            return
        idx = torch.tensor(keep, dtype=torch.long)
        for layer in self.cache.layers:
            layer_select_rows(layer, idx)
        self.key_pos = self.key_pos.index_select(0, idx)
        used = (self.key_pos >= 0).any(0).nonzero()
        first = int(used[0]) if len(used) else self.width
        if first >= COMPACT_AT:
            for layer in self.cache.layers:
                layer_drop_prefix(layer, first)
            self.key_pos = self.key_pos[:, first:]

    def forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        stats,
        tree: torch.Tensor | None = None,
        select: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append the block ``ids`` (B, T) at positions ``pos`` (-1: padding) and run the model over it.

        Returns the last column's logits (B, 1, V), or with ``select`` (flat indices into B*T) the
        logits (N, V) of those tokens. ``tree`` (bool (B, T, R)): see ``models.base.build_mask``.
        """
        if ids.shape[0] != self.rows:
            raise RuntimeError(f"a block of {ids.shape[0]} rows for a lane of {self.rows}")  # a bug, not input
        self.key_pos = pos.clone() if self.key_pos is None else torch.cat([self.key_pos, pos], dim=1)
        key_valid = self.key_pos if tree is not None or not bool((self.key_pos >= 0).all()) else None
        return self.engine._forward(
            ids, self.cache, pos.clamp(min=0), key_valid, stats, last_only=select is None,
            **({} if tree is None else {"tree": tree}), **({} if select is None else {"select": select}),
        )

    def keep_columns(self, start: int, cols: list[list[int]]) -> None:
        """Of the columns from ``start`` on, keep row b's ``cols[b]`` (ascending, relative to ``start``),
        right-aligned in a block as wide as the longest; the rest of that block is padding."""
        L = max((len(c) for c in cols), default=0)
        index = torch.zeros((self.rows, L), dtype=torch.long)
        keep = torch.zeros((self.rows, L), dtype=torch.bool)
        for b, c in enumerate(cols):
            if c:
                index[b, L - len(c) :] = torch.tensor(c, dtype=torch.long)
                keep[b, L - len(c) :] = True
        for layer in self.cache.layers:
            layer_keep_columns(layer, start, index)
        kp = self.key_pos[:, start:].gather(1, index)
        self.key_pos = torch.cat([self.key_pos[:, :start], kp.masked_fill(~keep, -1)], dim=1)
