"""Model weights placed on tiers per layer, and the per-layer load onto the compute device.

Each layer's weights are split by the policy (memory.place_layer_weights). Off-device shares are
packed: the CPU share in one host buffer (pinned on CUDA hosts), the disk share in one file. Loading
a layer is then one read of its disk share into a host staging slot and, on CUDA, one copy of each
share into a device staging slot; the returned tensors are views into those slots.

With `compress_weight`, a weight is stored as its compressed parts (compression.py) on every tier,
so disk and PCIe traffic shrink too, and is decompressed into a dense slot on the compute device
as part of the load.
"""

from __future__ import annotations

import torch

from flexgen_core.compression import (
    CompressedMeta,
    CompressedTensor,
    compress,
    decompress,
    stored_parts,
)
from flexgen_core.memory import (
    align,
    num_slots,
    packed_offsets,
    place_layer_weights,
    weight_compression,
)
from flexgen_core.runtime.storage import (
    Devices,
    OffloadDir,
    Slots,
    torch_dtype,
    view_as,
)
from flexgen_core.runtime.streams import copy_, stream_ordered


class WeightStore:
    def __init__(self, layers, policy, devices: Devices, dtype: torch.dtype, offload: OffloadDir):
        self.layers = layers
        self.devices = devices
        self.dtype = dtype
        self.compression = weight_compression(policy)
        self.placements = [place_layer_weights(layer.specs, policy, dtype.itemsize) for layer in layers]
        self.specs = [{s.name: s for s in layer.specs} for layer in layers]
        # (layer, weight) -> [(part name, torch dtype, shape)]; a plain weight is one part named "".
        self.parts = [{s.name: self._parts(s) for s in layer.specs} for layer in layers]
        self.resident: list[dict[str, object]] = [{} for _ in layers]  # gpu tier: tensors or CompressedTensors
        self.host_packed: list[torch.Tensor | None] = []
        self.disk_files = []
        self.offsets: list[dict[str, dict[tuple[str, str], int]]] = []  # tier -> (weight, part) -> offset
        self.packed_bytes: list[dict[str, int]] = []
        dense_bytes = 0
        for layer_idx, placement in enumerate(self.placements):
            offsets, sizes = {}, {}
            for tier in ("cpu", "disk"):
                keys = [(p.name, part) for p in placement if p.tier == tier for part, _, _ in self.parts[layer_idx][p.name]]
                part_bytes = [n for p in placement if p.tier == tier for n in p.part_nbytes]
                tier_offsets, sizes[tier] = packed_offsets(part_bytes)
                offsets[tier] = dict(zip(keys, tier_offsets))
            self.offsets.append(offsets)
            self.packed_bytes.append(sizes)
            self.host_packed.append(devices.empty("cpu", sizes["cpu"], pin=policy.pin_weight) if sizes["cpu"] else None)
            self.disk_files.append(offload.file(f"weights-{layer_idx}.bin", sizes["disk"]) if sizes["disk"] else None)
            if self.compression is not None:
                dense = [align(s.numel * dtype.itemsize) for s in layers[layer_idx].specs if self._compressed(s)]
                dense_bytes = max(dense_bytes, sum(dense))
        slots = num_slots(policy)
        self.host_slots = Slots(devices, "cpu", max(p["disk"] for p in self.packed_bytes), slots)
        device_stage = max(p["cpu"] + p["disk"] for p in self.packed_bytes) if devices.separate_device else 0
        self.device_slots = Slots(devices, "gpu", device_stage, slots)
        self.dense_slots = Slots(devices, "gpu", dense_bytes, slots)

    def _compressed(self, spec) -> bool:
        return self.compression is not None and spec.compress_group_dim is not None

    def _config(self, spec):
        return self.compression.with_group_dim(spec.compress_group_dim)

    def _parts(self, spec) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        if self._compressed(spec):
            return [(name, torch_dtype(dtype), shape) for name, dtype, shape in stored_parts(spec.shape, self._config(spec))]
        return [("", self.dtype, spec.shape)]

    def tier_of(self, layer_idx: int, name: str) -> str:
        return next(p.tier for p in self.placements[layer_idx] if p.name == name)

    def put(self, layer_idx: int, name: str, tensor: torch.Tensor, source: str = "the checkpoint") -> None:
        """Place one checkpoint tensor (any dtype, on the host) into its tier, compressing it if set.
        A tensor with NaN or inf values (in `source`, or after the cast to the compute dtype) is an
        error: one pass over the weights at load, about 0.1 s per GB on one CPU core."""
        spec = self.specs[layer_idx][name]
        if tuple(tensor.shape) != tuple(spec.shape):
            raise ValueError(
                f"weight {self.layers[layer_idx].name}.{name} has shape {tuple(tensor.shape)} in {source}, "
                f"expected {tuple(spec.shape)} from config.json"
            )
        cast = tensor.to(self.dtype)
        if cast.is_floating_point() and not torch.isfinite(cast).all():
            bad = int((~torch.isfinite(cast)).sum())
            where = "" if torch.isfinite(tensor).all() else f" ({tensor.dtype} values in {source})"
            raise ValueError(f"weight {self.layers[layer_idx].name}.{name} from {source} has {bad} NaN or infinite "
                             f"values as {self.dtype}{where}; the checkpoint is corrupt"
                             + ("" if where else f" or does not fit {self.dtype}: use a wider dtype"))
        tensor = cast
        stored = compress(tensor, self._config(spec)).tensors() if self._compressed(spec) else {"": tensor}
        tier = self.tier_of(layer_idx, name)
        if tier == "gpu":
            on_device = {part: t.to(self.devices.compute, copy=True).contiguous() for part, t in stored.items()}
            self.resident[layer_idx][name] = on_device
            return
        for part, t in stored.items():
            offset = self.offsets[layer_idx][tier][(name, part)]
            if tier == "cpu":
                view_as(self.host_packed[layer_idx], offset, t.dtype, t.shape).copy_(t)
            else:
                self.disk_files[layer_idx].write(offset, t)

    def load(self, layer_idx: int, slot: int) -> dict[str, torch.Tensor]:
        """The layer's weights on the compute device. Runs on an I/O thread; uses staging slot `slot`."""
        sizes = self.packed_bytes[layer_idx]
        sources = {"cpu": self.host_packed[layer_idx], "disk": None}
        if sizes["disk"]:
            sources["disk"] = self.host_slots.get(slot)[:sizes["disk"]]
            self.disk_files[layer_idx].read_into(0, sources["disk"])
        if self.devices.separate_device:
            start = 0
            for tier in ("cpu", "disk"):
                if sizes[tier]:
                    device_buf = self.device_slots.get(slot)[start:start + sizes[tier]]
                    copy_(device_buf, sources[tier][:sizes[tier]])
                    sources[tier] = device_buf
                    start += sizes[tier]
        weights, dense_offset = {}, 0
        for placement in self.placements[layer_idx]:
            name, spec = placement.name, self.specs[layer_idx][placement.name]
            if placement.tier == "gpu":
                parts = self.resident[layer_idx][name]
            else:
                offsets = self.offsets[layer_idx][placement.tier]
                parts = {part: view_as(sources[placement.tier], offsets[(name, part)], dtype, shape)
                         for part, dtype, shape in self.parts[layer_idx][name]}
            if not self._compressed(spec):
                weights[name] = parts[""]
                continue
            out = view_as(self.dense_slots.get(slot), dense_offset, self.dtype, spec.shape)
            dense_offset += align(spec.numel * self.dtype.itemsize)
            meta = CompressedMeta(spec.shape, str(self.dtype).removeprefix("torch."), self._config(spec))
            stream_ordered(decompress, CompressedTensor.from_tensors(meta, parts), out=out)  # after the copies
            weights[name] = out
        return weights

    def nonfinite(self) -> list[tuple[int, str, str, int]]:
        """(layer, weight, tier, count) for each stored weight holding NaN or inf values, read back from
        its tier as a forward pass would read it. For diagnosis only (reads every weight): call it
        with no block running."""
        found = []
        for layer_idx in range(len(self.layers)):
            weights = self.load(layer_idx, 0)
            self.devices.synchronize()
            for name, tensor in weights.items():
                bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
                if bad:
                    found.append((layer_idx, name, self.tier_of(layer_idx, name), bad))
        return found

    def allocated(self) -> dict[str, dict[str, int]]:
        """Real bytes per tier held for weights and their staging (checked against memory.account)."""
        weights = {
            "gpu": sum(t.untyped_storage().nbytes() for layer in self.resident for parts in layer.values()
                       for t in parts.values()),
            "cpu": sum(t.untyped_storage().nbytes() for t in self.host_packed if t is not None),
            "disk": sum(f.size_on_disk() for f in self.disk_files if f is not None),
        }
        staging = {"gpu": self.device_slots.nbytes + self.dense_slots.nbytes, "cpu": self.host_slots.nbytes, "disk": 0}
        return {"weights": weights, "weight_staging": staging}
