"""Hidden states of each GPU batch between layers, split by batch rows across tiers.

A batch held wholly on the compute device keeps its hidden tensor as it is. Otherwise each tier's rows
have a home allocated once per block: a compute-tier buffer, a host buffer, or an offload file, and a
load assembles the batch on the compute device from them; rows on disk are read through one host
staging buffer (loads run one at a time, each finished before the next starts).
"""

from __future__ import annotations

import torch

from flexgen_core.placement import split_ranges
from flexgen_core.runtime.storage import Devices, OffloadDir, view_as
from flexgen_core.runtime.streams import copy_


class Activations:
    def __init__(self, policy, devices: Devices, dtype: torch.dtype, offload: OffloadDir,
                 batch_sizes: list[int], max_len: int, hidden_size: int):
        self.devices = devices
        self.dtype = dtype
        self.offload = offload
        self.hidden_size = hidden_size
        self.ranges = [split_ranges(b, policy.act_gpu_percent, policy.act_cpu_percent) for b in batch_sizes]
        self.capacity = [list(r) for r in self.ranges]  # the rows each home was allocated for
        self.on_device = [tensor_ranges == [("gpu", 0, b)] for tensor_ranges, b in zip(self.ranges, batch_sizes)]
        self.held: list[dict[str, object]] = []  # per batch: tier -> gpu tensor or buffer, host buffer, file
        self.seq_len = [0] * len(batch_sizes)
        row_bytes = max_len * hidden_size * dtype.itemsize
        disk_rows = 0
        for batch_idx, ranges in enumerate(self.ranges):
            homes = {}
            for tier, start, stop in ranges if not self.on_device[batch_idx] else ():
                nbytes = (stop - start) * row_bytes
                if tier == "disk":
                    homes[tier] = offload.file(f"act-{batch_idx}.bin", nbytes)
                    disk_rows = max(disk_rows, stop - start)
                else:
                    homes[tier] = devices.empty(tier, nbytes)
            self.held.append(homes)
        self.staging = devices.empty("cpu", disk_rows * row_bytes) if disk_rows else None

    def store(self, batch_idx: int, hidden: torch.Tensor) -> None:
        """Keep (B, s, H) hidden states of one batch on their tiers. Runs on an I/O thread."""
        homes = self.held[batch_idx]
        self.seq_len[batch_idx] = hidden.shape[1]
        if self.on_device[batch_idx]:
            homes["gpu"] = hidden
            return
        for tier, start, stop in self.ranges[batch_idx]:
            rows = hidden[start:stop]
            if tier == "disk":
                homes["disk"].write(0, rows.to(self.devices.host))
            else:
                copy_(view_as(homes[tier], 0, self.dtype, rows.shape), rows)

    def load(self, batch_idx: int) -> torch.Tensor:
        """The batch's hidden states on the compute device. Runs on an I/O thread."""
        homes = self.held[batch_idx]
        if self.on_device[batch_idx]:
            return homes["gpu"]
        seq_len = self.seq_len[batch_idx]
        batch = self.ranges[batch_idx][-1][2]
        out = torch.empty((batch, seq_len, self.hidden_size), dtype=self.dtype, device=self.devices.compute)
        for tier, start, stop in self.ranges[batch_idx]:
            shape = (stop - start, seq_len, self.hidden_size)
            if tier == "disk":
                host = view_as(self.staging, 0, self.dtype, shape)
                homes["disk"].read_into(0, host)
                copy_(out[start:stop], host)
            else:
                copy_(out[start:stop], view_as(homes[tier], 0, self.dtype, shape))
        return out

    def compact(self, batch_idx: int, rows: int) -> None:
        """A batch now has `rows` rows, at most those it was allocated for (finished sequences left it,
        or its prompt pass ran on its distinct prompts only; between steps: nothing of it is held then).
        The rows fill the batch's homes tier by tier, compute tier first, each home up to the rows it
        was allocated for, so nothing new is allocated."""
        ranges, start = [], 0
        for tier, first, stop in self.capacity[batch_idx]:
            count = min(stop - first, rows - start)
            if count > 0:
                ranges.append((tier, start, start + count))
                start += count
        self.ranges[batch_idx] = ranges

    def allocated(self) -> dict[str, int]:
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for homes in self.held:
            for tier, home in homes.items():
                out[tier] += home.size_on_disk() if tier == "disk" else home.untyped_storage().nbytes()
        if self.staging is not None:
            out["cpu"] += self.staging.untyped_storage().nbytes()
        return out

    def close(self) -> None:
        for homes in self.held:
            if "disk" in homes:
                self.offload.release(homes["disk"])
        self.held.clear()
        self.staging = None
