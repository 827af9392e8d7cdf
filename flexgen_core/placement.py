"""Where each tensor is placed: the rules shared by the runtime, the memory accounting and the planner.

Pure arithmetic, no torch. A policy gives, for weights, KV cache and activations, a GPU share and a CPU
share in percent; the disk holds the rest (policy.py). These functions turn the shares into places:
- a layer's weights by bytes: each weight goes to the tier whose share of the layer's bytes holds the
  midpoint of the weight's own bytes (the FlexGen paper's per-layer percentages);
- the KV cache by KV heads and activations by batch rows: cumulative shares rounded to whole units;
- where attention over each cache segment runs: on the compute device, or on the CPU where an
  off-device segment lies when the policy says so (`cpu_cache_compute`) and the compute device is
  memory of its own; a prompt pass always attends on the compute device (its fresh K/V are there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

TIERS = ("gpu", "cpu", "disk")


def split_counts(n: int, gpu_percent: int, cpu_percent: int) -> tuple[int, int, int]:
    """Split n units (heads, batch rows) into (gpu, cpu, disk) counts, rounding cumulative shares."""
    gpu_end = (n * gpu_percent + 50) // 100
    cpu_end = (n * (gpu_percent + cpu_percent) + 50) // 100
    return gpu_end, cpu_end - gpu_end, n - cpu_end


def split_ranges(n: int, gpu_percent: int, cpu_percent: int) -> list[tuple[str, int, int]]:
    """Non-empty (tier, start, stop) ranges of a tier split, in tier order."""
    ranges, start = [], 0
    for tier, count in zip(TIERS, split_counts(n, gpu_percent, cpu_percent)):
        if count:
            ranges.append((tier, start, start + count))
            start += count
    return ranges


def weight_tiers(sizes: Sequence[int], gpu_percent: int, cpu_percent: int) -> list[str]:
    """Tier of each of a layer's weights: a weight goes to the tier whose share of the layer's bytes
    contains the midpoint of the weight's own bytes (FlexGen paper's per-layer percentages)."""
    total = sum(sizes)
    tiers, before = [], 0
    for size in sizes:
        mid = (before + size / 2) / total * 100 if total else 0.0
        tiers.append("gpu" if mid < gpu_percent else "cpu" if mid < gpu_percent + cpu_percent else "disk")
        before += size
    return tiers


@dataclass(frozen=True)
class CacheSegment:
    """KV heads [start, stop) of one attention layer, stored on `tier`; decode attention runs on
    `compute_on`."""

    tier: str
    start: int
    stop: int
    compute_on: str  # "gpu" or "cpu"

    @property
    def num_heads(self) -> int:
        return self.stop - self.start

    def attends_on(self, prompt_pass: bool) -> str:
        """Where attention over this segment runs: a prompt pass on the compute device, where its fresh
        K/V are (they are stored after), a decode step on `compute_on`."""
        return "gpu" if prompt_pass else self.compute_on


def cache_segments(num_kv_heads: int, policy, separate_device: bool) -> list[CacheSegment]:
    """The KV heads of one attention layer by tier. `separate_device`: the compute tier is memory of its own
    (a GPU, or the simulated device), so off-device segments may attend on the CPU where they lie."""
    segments = []
    for tier, start, stop in split_ranges(num_kv_heads, policy.cache_gpu_percent, policy.cache_cpu_percent):
        on_cpu = tier != "gpu" and policy.cpu_cache_compute and separate_device
        segments.append(CacheSegment(tier, start, stop, "cpu" if on_cpu else "gpu"))
    return segments


def cache_staging_tiers(segment: CacheSegment, separate_device: bool) -> list[str]:
    """Where a segment's cache is staged for attention: host buffer for disk reads, device buffer for
    host->device copies. Resident segments attend in place."""
    tiers = []
    if segment.tier == "disk":
        tiers.append("cpu")
    if separate_device and segment.tier != "gpu" and segment.compute_on == "gpu":
        tiers.append("gpu")
    return tiers


__all__ = ["TIERS", "CacheSegment", "cache_segments", "cache_staging_tiers", "split_counts", "split_ranges",
           "weight_tiers"]
