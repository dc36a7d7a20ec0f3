"""Timing and memory figures collected while generating."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux this is VmHWM: getrusage's ru_maxrss survives exec, so a child
    started from a large parent would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
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
    copy_s: float = 0.0  # CUDA: host -> device copies of streamed layers (on the copy stream, overlapping compute)
    peak_rss_bytes: int = 0
    stall_s: float = 0.0
    steps: int = 0
    step_s: float = 0.0
    layer_compute_s: dict = field(default_factory=dict)
    peak_vram_bytes: int = 0
    prefetch: int = 0
    resident_layers: int = 0
    streamed_layers: int = 0
    direct_io: bool = False
    plan: list[str] = field(default_factory=list)
    read_intervals: list = field(default_factory=list, repr=False)
    mode: str = "stream"
    kv_location: str = "cpu"  # where the KV cache lives: cpu, cuda, or host (copied to the device per layer)
    reader: str = "pread"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0  # torch compute threads (--threads)
    notes: list[str] = field(default_factory=list)
    # mixture-of-experts layers streamed with routed expert reads
    experts_read: int = 0  # expert loads, summed over layers and steps
    experts_total: int = 0  # experts those layers hold, summed the same way
    expert_bytes_read: int = 0
    expert_bytes_skipped: int = 0  # bytes of experts no token routed to: never read

    @property
    def decode_tokens_per_s(self) -> float:
        # The first generated token comes from prefill; decode covers the rest.
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    @property
    def read_gb_s(self) -> float:
        """Aggregate read throughput: bytes over the time the disk was busy."""
        busy = self.read_busy_s or self.read_s
        return self.bytes_read / busy / 1e9 if busy > 0 else 0.0

    @property
    def read_busy_s(self) -> float:
        """Time the disk was busy: the union of read intervals (reads overlap each other when prefetching)."""
        total, end = 0.0, float("-inf")
        for a, b in sorted(self.read_intervals):
            if b <= end:
                continue
            total += b - max(a, end)
            end = b
        return total

    @property
    def stall_pct(self) -> float:
        return 100.0 * self.stall_s / self.step_s if self.step_s > 0 else 0.0

    @property
    def overlap_efficiency(self) -> float:
        """Step time / max(sum of reads, sum of computes): 1.0 means I/O fully hidden behind compute (or vice versa)."""
        bound = max(self.read_busy_s, self.compute_s)
        return self.step_s / bound if bound > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("read_intervals")
        d["read_busy_s"] = round(self.read_busy_s, 4)
        d["stall_pct"] = round(self.stall_pct, 2)
        d["overlap_efficiency"] = round(self.overlap_efficiency, 3)
        d["layer_compute_s"] = {str(k): round(v, 5) for k, v in self.layer_compute_s.items()}
        d["decode_tokens_per_s"] = round(self.decode_tokens_per_s, 3)
        d["read_gb_s"] = round(self.read_gb_s, 3)
        for k in ("prefill_s", "decode_s", "read_s", "compute_s", "stall_s", "step_s", "copy_s"):
            d[k] = round(d[k], 4)
        return d

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok | generated {self.generated_tokens} tok | "
            f"prefill {self.prefill_s:.2f} s | decode {self.decode_tokens_per_s:.2f} tok/s | "
            f"read {self.bytes_read / 1e9:.2f} GB at {self.read_gb_s:.2f} GB/s | "
            f"stall {self.stall_pct:.0f}% | peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB | "
            f"{self.mode}/{self.reader}/{self.device}/{self.dtype}"
        )
