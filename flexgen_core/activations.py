"""Hidden states of each GPU batch between layers, split by batch rows across tiers."""

from __future__ import annotations

import torch

from flexgen_core.memory import split_ranges
from flexgen_core.storage import Devices, OffloadDir, view_as
from flexgen_core.streams import copy_


class Activations:
    def __init__(self, policy, devices: Devices, dtype: torch.dtype, offload: OffloadDir,
                 batch_sizes: list[int], max_len: int, hidden_size: int):
        self.devices = devices
        self.dtype = dtype
        self.offload = offload
        self.hidden_size = hidden_size
        self.ranges = [split_ranges(b, policy.act_gpu_percent, policy.act_cpu_percent) for b in batch_sizes]
        self.on_device = [tensor_ranges == [("gpu", 0, b)] for tensor_ranges, b in zip(self.ranges, batch_sizes)]
        self.held: list[dict[str, object]] = []  # per batch: tier -> gpu tensor, host buffer or file
        self.seq_len = [0] * len(batch_sizes)
        for batch_idx, ranges in enumerate(self.ranges):
            homes = {}
            for tier, start, stop in ranges:
                nbytes = (stop - start) * max_len * hidden_size * dtype.itemsize
                if tier == "cpu":
                    homes[tier] = devices.empty("cpu", nbytes)
                elif tier == "disk":
                    homes[tier] = offload.file(f"act-{batch_idx}.bin", nbytes)
            self.held.append(homes)

    def store(self, batch_idx: int, hidden: torch.Tensor) -> None:
        """Keep (B, s, H) hidden states of one batch on their tiers. Runs on an I/O thread."""
        homes = self.held[batch_idx]
        self.seq_len[batch_idx] = hidden.shape[1]
        if self.on_device[batch_idx]:
            homes["gpu"] = hidden
            return
        for tier, start, stop in self.ranges[batch_idx]:
            rows = hidden[start:stop]
            if tier == "gpu":
                homes["gpu"] = rows.clone()
            elif tier == "cpu":
                copy_(view_as(homes["cpu"], 0, self.dtype, rows.shape), rows)
            else:
                homes["disk"].write(0, rows.to(self.devices.host))

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
            if tier == "gpu":
                copy_(out[start:stop], homes["gpu"])
            elif tier == "cpu":
                copy_(out[start:stop], view_as(homes["cpu"], 0, self.dtype, shape))
            else:
                host = torch.empty(shape, dtype=self.dtype, pin_memory=self.devices.cuda)
                homes["disk"].read_into(0, host)
                copy_(out[start:stop], host)
        return out

    def allocated(self) -> dict[str, int]:
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for homes in self.held:
            for tier, home in homes.items():
                out[tier] += home.size_on_disk() if tier == "disk" else home.untyped_storage().nbytes()
        return out

    def close(self) -> None:
        for homes in self.held:
            if "disk" in homes:
                self.offload.release(homes["disk"])
        self.held.clear()
