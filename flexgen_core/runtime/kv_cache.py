"""The KV cache of one block: for each attention layer and GPU batch, K and V split across tiers by heads.

Layout of every segment, on every tier: (total_len, 2, B, heads, head_dim) -- positions first, then
K/V -- so the rows of the first t positions are one contiguous range (one read from disk) and a new
token's K and V are one contiguous write.

With `compress_cache`, a segment is stored as the compressed parts of that tensor (4 bits, groups
along head_dim; compression.py keeps the leading position dimension in every part), on every tier.
A load then decompresses rows [0, t) into a dense buffer where the segment's attention runs, and a
store compresses the new rows.
"""

from __future__ import annotations

from math import prod

import torch

from flexgen_core.compression import (
    CompressedMeta,
    CompressedTensor,
    compress,
    decompress,
    stored_parts,
)
from flexgen_core.memory import CACHE_COMPRESSION, num_slots
from flexgen_core.placement import cache_segments, cache_staging_tiers
from flexgen_core.runtime.storage import (
    Devices,
    OffloadDir,
    Slots,
    torch_dtype,
    view_as,
)
from flexgen_core.runtime.streams import copy_, stream_ordered


class _Segment:
    """How one segment (a range of KV heads on one tier) is stored: its parts, each position-major."""

    def __init__(self, seg, total_len: int, head_dim: int, dtype: torch.dtype, compressed: bool):
        self.seg = seg
        self.total_len = total_len
        self.head_dim = head_dim
        self.dtype = dtype
        self.compressed = compressed

    def dense_shape(self, batch: int) -> tuple[int, ...]:
        return (self.total_len, 2, batch, self.seg.num_heads, self.head_dim)

    def parts(self, batch: int) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        shape = self.dense_shape(batch)
        if not self.compressed:
            return [("kv", self.dtype, shape)]
        return [(name, torch_dtype(dtype), shape) for name, dtype, shape in stored_parts(shape, CACHE_COMPRESSION)]

    def nbytes(self, batch: int) -> int:
        return sum(prod(shape) * dtype.itemsize for _, dtype, shape in self.parts(batch))

    def meta(self, batch: int, rows: int) -> CompressedMeta:
        return CompressedMeta((rows,) + self.dense_shape(batch)[1:], str(self.dtype).removeprefix("torch."),
                              CACHE_COMPRESSION)


class KVCache:
    def __init__(self, shape, policy, devices: Devices, dtype: torch.dtype, offload: OffloadDir,
                 num_attention: int, batch_sizes: list[int], total_len: int, label: str = "cache"):
        """`label` names its offload files: a block's cache and a shared prefix's live side by side."""
        self.devices = devices
        self.dtype = dtype
        self.offload = offload
        self.batch_sizes = batch_sizes
        self.segments = cache_segments(shape.num_kv_heads, policy, devices.separate_device)
        self.layouts = [_Segment(seg, total_len, shape.head_dim, dtype, policy.compress_cache) for seg in self.segments]
        # (attention layer, batch) -> per segment: part name -> tensor (gpu/cpu tier) or DiskFile (disk)
        self.homes: dict[tuple[int, int], list[dict[str, object]]] = {}
        self.buffers: dict[tuple[int, int, int, str], torch.Tensor] = {}  # the bytes under each gpu/cpu home
        for attn_idx in range(num_attention):
            for batch_idx, batch in enumerate(batch_sizes):
                homes = []
                for seg_idx, layout in enumerate(self.layouts):
                    parts = {}
                    for name, part_dtype, part_shape in layout.parts(batch):
                        nbytes = prod(part_shape) * part_dtype.itemsize
                        if layout.seg.tier == "disk":
                            parts[name] = offload.file(f"{label}-{attn_idx}-{batch_idx}-{seg_idx}-{name}.bin", nbytes)
                        else:
                            buffer = devices.empty(layout.seg.tier, nbytes)
                            self.buffers[(attn_idx, batch_idx, seg_idx, name)] = buffer
                            parts[name] = view_as(buffer, 0, part_dtype, part_shape)
                    homes.append(parts)
                self.homes[(attn_idx, batch_idx)] = homes
        slots, widest = num_slots(policy), max(batch_sizes)
        # Staging per (segment, tier): one slot buffer per stored part; plus dense rows when compressed.
        self.staging: dict[tuple[int, str], dict[str, Slots]] = {}
        self.dense: dict[int, Slots] = {}
        for seg_idx, layout in enumerate(self.layouts):
            for tier in cache_staging_tiers(layout.seg, devices.separate_device):
                self.staging[(seg_idx, tier)] = {
                    name: Slots(devices, tier, prod(part_shape) * part_dtype.itemsize, slots)
                    for name, part_dtype, part_shape in layout.parts(widest)}
            if layout.compressed:
                dense_bytes = prod(layout.dense_shape(widest)) * dtype.itemsize
                self.dense[seg_idx] = Slots(devices, layout.seg.compute_on, dense_bytes, slots)

    def load(self, attn_idx: int, batch_idx: int, upto: int, slot: int) -> list[torch.Tensor]:
        """Each segment's dense (total_len, 2, B, heads, head_dim) buffer, on the device its attention
        runs on, with rows [0, upto) filled. Runs on an I/O thread. The decode step then writes row
        `upto` in place."""
        batch = self.batch_sizes[batch_idx]
        out = []
        for seg_idx, (layout, home) in enumerate(zip(self.layouts, self.homes[(attn_idx, batch_idx)])):
            parts = {}
            for name, part_dtype, part_shape in layout.parts(batch):
                if layout.seg.tier == "disk":
                    src = view_as(self.staging[(seg_idx, "cpu")][name].get(slot), 0, part_dtype, part_shape)
                    home[name].read_into(0, src[:upto])
                else:
                    src = home[name]
                if (seg_idx, "gpu") in self.staging:
                    dst = view_as(self.staging[(seg_idx, "gpu")][name].get(slot), 0, part_dtype, part_shape)
                    copy_(dst[:upto], src[:upto])
                    src = dst
                parts[name] = src
            if not layout.compressed:
                out.append(parts["kv"])
                continue
            dense = view_as(self.dense[seg_idx].get(slot), 0, self.dtype, layout.dense_shape(batch))
            if upto:
                rows = CompressedTensor.from_tensors(layout.meta(batch, upto), {n: t[:upto] for n, t in parts.items()})
                stream_ordered(decompress, rows, out=dense[:upto])  # after the copies into the staging slot
            out.append(dense)
        return out

    def store(self, attn_idx: int, batch_idx: int, start: int, rows: list[torch.Tensor]) -> None:
        """Persist dense rows [start, start + len) of each segment to its home tier (a no-op where the
        rows were written in place). Runs on an I/O thread."""
        for layout, home, src in zip(self.layouts, self.homes[(attn_idx, batch_idx)], rows):
            parts = compress(src, CACHE_COMPRESSION).tensors() if layout.compressed else {"kv": src}
            for name, part in parts.items():
                target = home[name]
                if layout.seg.tier == "disk":
                    row_bytes = part[0].numel() * part.element_size()
                    target.write(start * row_bytes, part.to(self.devices.host))
                elif part.data_ptr() != target[start].data_ptr():
                    copy_(target[start:start + part.shape[0]], part)

    def compact(self, batch_idx: int, keep: torch.Tensor, rows: int) -> None:
        """Lay one GPU batch out anew as the batch rows `keep` (indices into its current rows; repeats
        allowed) in every attention layer: rows [0, `rows`) of each segment are gathered and rewritten
        in place for the new batch size, at most the one its homes and staging slots were allocated
        for. Packs finished sequences away, and forks prompts into their sampled completions. Runs on
        the compute thread, with no copy of this batch in flight."""
        old = self.batch_sizes[batch_idx]
        new = len(keep)
        for (attn_idx, b_idx), homes in self.homes.items():
            if b_idx != batch_idx:
                continue
            for seg_idx, (layout, parts) in enumerate(zip(self.layouts, homes)):
                for (name, part_dtype, old_shape), (_, _, new_shape) in zip(layout.parts(old), layout.parts(new)):
                    assert old_shape[2] == old and new_shape[2] == new  # every part keeps the batch at dim 2
                    home = parts[name]
                    if layout.seg.tier == "disk":
                        held = torch.empty((rows,) + tuple(old_shape[1:]), dtype=part_dtype, device=self.devices.host)
                        home.read_into(0, held)
                        home.write(0, held.index_select(2, keep.to(held.device)).contiguous())
                    else:
                        kept = home[:rows].index_select(2, keep.to(home.device))
                        buffer = self.buffers[(attn_idx, batch_idx, seg_idx, name)]
                        parts[name] = view_as(buffer, 0, part_dtype, new_shape)
                        parts[name][:rows].copy_(kept)
        self.batch_sizes[batch_idx] = new

    def allocated(self) -> dict[str, dict[str, int]]:
        cache = {"gpu": 0, "cpu": 0, "disk": 0}
        for homes in self.homes.values():
            for layout, parts in zip(self.layouts, homes):
                for part in parts.values():
                    tier = layout.seg.tier
                    cache[tier] += part.size_on_disk() if tier == "disk" else part.untyped_storage().nbytes()
        staging = {"gpu": 0, "cpu": 0, "disk": 0}
        for (_, tier), by_part in self.staging.items():
            staging[tier] += sum(slots.nbytes for slots in by_part.values())
        for seg_idx, slots in self.dense.items():
            staging[self.layouts[seg_idx].seg.compute_on] += slots.nbytes
        return {"cache": cache, "cache_staging": staging}

    def close(self) -> None:
        for homes in self.homes.values():
            for layout, parts in zip(self.layouts, homes):
                if layout.seg.tier == "disk":
                    for f in parts.values():
                        self.offload.release(f)
        self.homes.clear()
        self.buffers.clear()
        self.staging.clear()
        self.dense.clear()
