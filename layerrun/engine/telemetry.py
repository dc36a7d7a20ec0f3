"""Timing and memory figures collected while generating."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


@dataclass
class LayerTiming:
    read_s: float = 0.0
    compute_s: float = 0.0
    bytes_read: int = 0
    count: int = 0


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    bytes_read: int = 0
    read_s: float = 0.0
    compute_s: float = 0.0
    peak_rss_bytes: int = 0
    mode: str = "stream"
    reader: str = "pread"
    device: str = "cpu"
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        # The first generated token comes from prefill; decode covers the rest.
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    @property
    def read_gb_s(self) -> float:
        return self.bytes_read / self.read_s / 1e9 if self.read_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decode_tokens_per_s"] = round(self.decode_tokens_per_s, 3)
        d["read_gb_s"] = round(self.read_gb_s, 3)
        for k in ("prefill_s", "decode_s", "read_s", "compute_s"):
            d[k] = round(d[k], 4)
        return d

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok | generated {self.generated_tokens} tok | "
            f"prefill {self.prefill_s:.2f} s | decode {self.decode_tokens_per_s:.2f} tok/s | "
            f"read {self.bytes_read / 1e9:.2f} GB at {self.read_gb_s:.2f} GB/s | "
            f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB | {self.mode}/{self.reader}/{self.device}/{self.dtype}"
        )
