"""Model weights placed on tiers per layer, and the per-layer load onto the compute device.

Each layer's weights are split by the policy (memory.place_layer_weights). Off-device shares are
packed: the CPU share in one host buffer (pinned on CUDA hosts), the disk share in one file. Loading
a layer is then one read of its disk share into a host staging slot and, on CUDA, one copy of each
share into a device staging slot; the returned tensors are views into those slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flexgen_core.memory import num_slots, packed_offsets, place_layer_weights
from flexgen_core.storage import Devices, OffloadDir, Slots, view_as


@dataclass
class _Packed:
    """Weights of one layer packed into one buffer or file: name -> byte offset."""

    offsets: dict[str, int]
    nbytes: int


class WeightStore:
    def __init__(self, layers, policy, devices: Devices, dtype: torch.dtype, offload: OffloadDir):
        self.layers = layers
        self.devices = devices
        self.dtype = dtype
        self.placements = [place_layer_weights(layer.specs, policy, dtype.itemsize) for layer in layers]
        self.shapes = [{s.name: s.shape for s in layer.specs} for layer in layers]
        self.resident: list[dict[str, torch.Tensor]] = [{} for _ in layers]  # gpu-tier tensors
        self.host_packed: list[torch.Tensor | None] = []   # cpu-tier share, one buffer per layer
        self.disk_files = []
        self.packs: list[dict[str, _Packed]] = []
        for layer_idx, placement in enumerate(self.placements):
            packs = {}
            for tier in ("cpu", "disk"):
                names = [p.name for p in placement if p.tier == tier]
                offsets, total = packed_offsets(p.nbytes for p in placement if p.tier == tier)
                packs[tier] = _Packed(dict(zip(names, offsets)), total)
            self.packs.append(packs)
            cpu_bytes, disk_bytes = packs["cpu"].nbytes, packs["disk"].nbytes
            self.host_packed.append(devices.empty("cpu", cpu_bytes, pin=policy.pin_weight) if cpu_bytes else None)
            self.disk_files.append(offload.file(f"weights-{layer_idx}.bin", disk_bytes) if disk_bytes else None)
        slots = num_slots(policy)
        self.host_slots = Slots(devices, "cpu", max(p["disk"].nbytes for p in self.packs), slots)
        device_stage = max(p["cpu"].nbytes + p["disk"].nbytes for p in self.packs) if devices.cuda else 0
        self.device_slots = Slots(devices, "gpu", device_stage, slots)

    def tier_of(self, layer_idx: int, name: str) -> str:
        return next(p.tier for p in self.placements[layer_idx] if p.name == name)

    def put(self, layer_idx: int, name: str, tensor: torch.Tensor) -> None:
        """Place one checkpoint tensor (any dtype, on the host) into its tier."""
        expected = self.shapes[layer_idx][name]
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(
                f"weight {self.layers[layer_idx].name}.{name} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"expected {tuple(expected)} from config.json"
            )
        tensor = tensor.to(self.dtype)
        tier = self.tier_of(layer_idx, name)
        if tier == "gpu":
            self.resident[layer_idx][name] = tensor.to(self.devices.compute, copy=True).contiguous()
        elif tier == "cpu":
            offset = self.packs[layer_idx]["cpu"].offsets[name]
            view_as(self.host_packed[layer_idx], offset, self.dtype, expected).copy_(tensor)
        else:
            self.disk_files[layer_idx].write(self.packs[layer_idx]["disk"].offsets[name], tensor)

    def load(self, layer_idx: int, slot: int) -> dict[str, torch.Tensor]:
        """The layer's weights on the compute device. Runs on an I/O thread; uses staging slot `slot`."""
        packs = self.packs[layer_idx]
        weights = dict(self.resident[layer_idx])
        host_disk = None
        if packs["disk"].nbytes:
            host_disk = self.host_slots.get(slot)[:packs["disk"].nbytes]
            self.disk_files[layer_idx].read_into(0, host_disk)
        sources = {"cpu": self.host_packed[layer_idx], "disk": host_disk}
        if self.devices.cuda:
            device_buf = self.device_slots.get(slot) if self.device_slots.buffers else None
            start = 0
            for tier in ("cpu", "disk"):
                n = packs[tier].nbytes
                if n:
                    device_buf[start:start + n].copy_(sources[tier][:n], non_blocking=True)
                    sources[tier] = device_buf[start:start + n]
                    start += n
        for tier in ("cpu", "disk"):
            for name, offset in packs[tier].offsets.items():
                weights[name] = view_as(sources[tier], offset, self.dtype, self.shapes[layer_idx][name])
        return weights

    def allocated(self) -> dict[str, dict[str, int]]:
        """Real bytes per tier held for weights and their staging (checked against memory.account)."""
        weights = {
            "gpu": sum(t.untyped_storage().nbytes() for layer in self.resident for t in layer.values()),
            "cpu": sum(t.untyped_storage().nbytes() for t in self.host_packed if t is not None),
            "disk": sum(f.size_on_disk() for f in self.disk_files if f is not None),
        }
        staging = {"gpu": self.device_slots.nbytes, "cpu": self.host_slots.nbytes, "disk": 0}
        return {"weights": weights, "weight_staging": staging}
