"""The KV cache of one block: for each attention layer and GPU batch, K and V split across tiers by heads.

Layout of every segment, on every tier: (total_len, 2, B, heads, head_dim) -- positions first, then
K/V -- so the rows of the first t positions are one contiguous range (one read from disk) and a new
token's K and V are one contiguous write.
"""

from __future__ import annotations

import torch

from flexgen_core.memory import cache_segments, cache_staging_tiers, num_slots
from flexgen_core.storage import Devices, OffloadDir, Slots, view_as


class KVCache:
    def __init__(self, shape, policy, devices: Devices, dtype: torch.dtype, offload: OffloadDir,
                 num_attention: int, batch_sizes: list[int], total_len: int):
        self.devices = devices
        self.dtype = dtype
        self.offload = offload
        self.total_len = total_len
        self.head_dim = shape.head_dim
        self.batch_sizes = batch_sizes
        self.segments = cache_segments(shape.num_kv_heads, policy, devices.cuda)
        self.homes: dict[tuple[int, int], list] = {}
        for attn_idx in range(num_attention):
            for batch_idx, batch in enumerate(batch_sizes):
                homes = []
                for seg in self.segments:
                    nbytes = self._seg_bytes(seg, batch)
                    if seg.tier == "disk":
                        homes.append(offload.file(f"cache-{attn_idx}-{batch_idx}.bin", nbytes))
                    else:
                        homes.append(view_as(devices.empty(seg.tier, nbytes), 0, dtype, self._seg_shape(seg, batch)))
                self.homes[(attn_idx, batch_idx)] = homes
        slots = num_slots(policy)
        self.staging = {
            (seg_idx, tier): Slots(devices, tier, self._seg_bytes(seg, max(batch_sizes)), slots)
            for seg_idx, seg in enumerate(self.segments)
            for tier in cache_staging_tiers(seg, devices.cuda)
        }

    def _seg_shape(self, seg, batch: int) -> tuple[int, ...]:
        return (self.total_len, 2, batch, seg.num_heads, self.head_dim)

    def _seg_bytes(self, seg, batch: int) -> int:
        return self.total_len * 2 * batch * seg.num_heads * self.head_dim * self.dtype.itemsize

    def load(self, attn_idx: int, batch_idx: int, upto: int, slot: int) -> list[torch.Tensor]:
        """Each segment's buffer, on the device its attention runs on, with rows [0, upto) filled.
        Runs on an I/O thread. Row `upto` may then be written in place by the decode step."""
        batch = self.batch_sizes[batch_idx]
        out = []
        for seg_idx, (seg, home) in enumerate(zip(self.segments, self.homes[(attn_idx, batch_idx)])):
            shape = self._seg_shape(seg, batch)
            if seg.tier == "disk":
                src = view_as(self.staging[(seg_idx, "cpu")].get(slot), 0, self.dtype, shape)
                home.read_into(0, src[:upto])
            else:
                src = home
            if (seg_idx, "gpu") in self.staging:
                dst = view_as(self.staging[(seg_idx, "gpu")].get(slot), 0, self.dtype, shape)
                dst[:upto].copy_(src[:upto], non_blocking=True)
                src = dst
            out.append(src)
        return out

    def store(self, attn_idx: int, batch_idx: int, start: int, rows: list[torch.Tensor]) -> None:
        """Persist rows [start, start + len) of each segment to its home tier (a no-op where the rows
        were written in place). Runs on an I/O thread."""
        for seg, home, src in zip(self.segments, self.homes[(attn_idx, batch_idx)], rows):
            stop = start + src.shape[0]
            if seg.tier == "disk":
                row_bytes = src[0].numel() * self.dtype.itemsize
                home.write(start * row_bytes, src.to(self.devices.host))
            elif src.data_ptr() != home[start].data_ptr():
                home[start:stop].copy_(src, non_blocking=True)

    def allocated(self) -> dict[str, dict[str, int]]:
        cache = {"gpu": 0, "cpu": 0, "disk": 0}
        for homes in self.homes.values():
            for seg, home in zip(self.segments, homes):
                cache[seg.tier] += home.size_on_disk() if seg.tier == "disk" else home.untyped_storage().nbytes()
        staging = {"gpu": 0, "cpu": 0, "disk": 0}
        for (_, tier), slots in self.staging.items():
            staging[tier] += slots.nbytes
        return {"cache": cache, "cache_staging": staging}

    def close(self) -> None:
        for homes in self.homes.values():
            for seg, home in zip(self.segments, homes):
                if seg.tier == "disk":
                    self.offload.release(home)
        self.homes.clear()
        self.staging.clear()
