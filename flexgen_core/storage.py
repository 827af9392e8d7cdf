"""Storage tiers and the copies between them: compute device, host RAM (pinned on CUDA hosts), disk.

Disk tensors live in preallocated files under the engine's offload directory and move with explicit
positional reads and writes into reusable buffers, so resident memory is bounded by the policy
(see memory.py), never by the model size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from flexgen_core.memory import ALIGN_BYTES

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def as_bytes(t: torch.Tensor):
    """A writable byte view (numpy) of a contiguous CPU tensor, for os.preadv/os.pwrite."""
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.reshape(-1).view(torch.uint8).numpy()


def view_as(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """A typed tensor view of `shape` into a uint8 buffer at a byte offset."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    return buffer[offset:offset + nbytes].view(dtype).view(shape)


class Devices:
    """The compute device and how host memory is allocated next to it."""

    def __init__(self, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this host")
        self.compute = torch.device(device)
        self.cuda = self.compute.type == "cuda"
        self.host = torch.device("cpu")

    def tier_device(self, tier: str) -> torch.device:
        return self.compute if tier == "gpu" else self.host

    def empty(self, tier: str, nbytes: int, pin: bool = True) -> torch.Tensor:
        """A uint8 buffer on a memory tier; host buffers are pinned on CUDA hosts for async copies."""
        assert tier in ("gpu", "cpu")
        if tier == "gpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=self.compute)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda and pin)


class DiskFile:
    """A preallocated file of `nbytes`, read and written at byte offsets."""

    def __init__(self, path: Path, nbytes: int):
        self.path = path
        self.nbytes = nbytes
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, nbytes)

    def write(self, offset: int, src: torch.Tensor) -> None:
        data = memoryview(as_bytes(src.contiguous()))
        assert offset + len(data) <= self.nbytes, (self.path, offset, len(data), self.nbytes)
        while data:
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written

    def read_into(self, offset: int, dst: torch.Tensor) -> None:
        view = memoryview(as_bytes(dst))
        assert offset + len(view) <= self.nbytes, (self.path, offset, len(view), self.nbytes)
        while view:
            got = os.preadv(self._fd, [view], offset)
            if got == 0:
                raise OSError(f"unexpected end of offload file {self.path} at byte {offset}")
            view, offset = view[got:], offset + got

    def size_on_disk(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OffloadDir:
    """This engine's own subdirectory of the offload dir, removed on close."""

    def __init__(self, root: str | os.PathLike | None):
        base = Path(root) if root is not None else Path(tempfile.gettempdir()) / "flexgen-offload"
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"offload_dir {str(base)!r} cannot be created: {e.strerror}") from None
        if not os.access(base, os.W_OK):
            raise ValueError(f"offload_dir {str(base)!r} is not writable")
        self.path = Path(tempfile.mkdtemp(prefix=f"engine-{os.getpid()}-", dir=base))
        self.files: list[DiskFile] = []

    def file(self, name: str, nbytes: int) -> DiskFile:
        f = DiskFile(self.path / name, nbytes)
        self.files.append(f)
        return f

    def release(self, f: DiskFile) -> None:
        f.close()
        self.files.remove(f)
        f.path.unlink(missing_ok=True)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files.clear()
        shutil.rmtree(self.path, ignore_errors=True)


class Slots:
    """Reusable staging buffers on one tier: request n gets slot n % num_slots (double buffering)."""

    def __init__(self, devices: Devices, tier: str, slot_bytes: int, num_slots: int):
        self.slot_bytes = slot_bytes
        self.buffers = [devices.empty(tier, slot_bytes) for _ in range(num_slots)] if slot_bytes else []

    def get(self, n: int) -> torch.Tensor:
        return self.buffers[n % len(self.buffers)]

    @property
    def nbytes(self) -> int:
        return self.slot_bytes * len(self.buffers)


__all__ = ["ALIGN_BYTES", "Devices", "DiskFile", "OffloadDir", "Slots", "TORCH_DTYPES", "as_bytes", "view_as"]
