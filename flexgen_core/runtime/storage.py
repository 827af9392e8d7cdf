"""Storage tiers and the copies between them: compute device, host RAM (pinned on CUDA hosts), disk.

Disk tensors live in preallocated files under the engine's offload directory and move with explicit
positional reads and writes into reusable buffers, so resident memory is bounded by the policy
(see memory.py), never by the model size.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
import weakref
from pathlib import Path

import torch

from flexgen_core.memory import DTYPE_BYTES
from flexgen_core.runtime.device_names import check_device_name
from flexgen_core.runtime.private_dir import open_private_folder, user_temp_folder
from flexgen_core.runtime.signals import install_signal_handlers, register_cleanup
from flexgen_core.runtime.simulated_cuda import SIMULATED_DEVICE, enter_on_this_thread, simulated_cuda
from flexgen_core.runtime.streams import CudaStream, SimulatedStream

log = logging.getLogger(__name__)

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_BYTES}  # the compute dtypes, by name


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name such as "uint8" or "float16" (stored parts name theirs)."""
    return getattr(torch, name)


def as_bytes(t: torch.Tensor):
    """A writable byte view (numpy) of a contiguous CPU tensor, for os.preadv/os.pwrite."""
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.reshape(-1).view(torch.uint8).numpy()


def view_as(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    """A typed tensor view of `shape` into a uint8 buffer at a byte offset."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    return buffer[offset:offset + nbytes].view(dtype).view(shape)




class Devices:
    """The compute device and how host memory is allocated next to it.

    `separate_device` says whether the compute tier ("gpu") is memory of its own, reached from the host tier
    ("cpu") by explicit copies: true on CUDA and on the simulated device, false on a plain CPU, where
    both tiers are the same RAM and no staging copies are made. The simulated device is a GPU that
    CPU-only hosts can run (simulated_cuda.py): its tensors report `cuda:0`, keep real values on the
    CPU, raise CUDA's errors when mixed with host tensors and count the bytes CUDA would allocate;
    every host <-> device copy runs asynchronously on a simulated stream (streams.py). So every code
    path of a GPU host except the CUDA calls themselves runs in CI. Code that makes device tensors
    runs under `active()` (the engine's entry points) or on a thread set up by `enter_thread()`.
    """

    def __init__(self, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        check_device_name(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this host")
        self.simulated = device == "simulated"
        self.compute = SIMULATED_DEVICE if self.simulated else torch.device(device)
        self.cuda = self.compute.type == "cuda" and not self.simulated  # CUDA's own API is there to call
        self.separate_device = self.cuda or self.simulated
        if self.cuda:
            _expandable_segments()
        self.host = torch.device("cpu")
        # What the planner's hardware profiles call this machine: the simulated GPU runs at CPU speed.
        self.profile_device = "cpu" if self.simulated else self.compute.type
        self._streams = 0

    def active(self):
        """A context in which `cuda` tensors are the simulated device's (a no-op elsewhere)."""
        return simulated_cuda() if self.simulated else contextlib.nullcontext()

    def enter_thread(self) -> None:
        """Set up a worker thread that makes device tensors (a no-op except on the simulated device)."""
        if self.simulated:
            enter_on_this_thread()

    def tier_device(self, tier: str) -> torch.device:
        return self.compute if tier == "gpu" else self.host

    def empty(self, tier: str, nbytes: int, pin: bool = True) -> torch.Tensor:
        """A uint8 buffer on a memory tier; host buffers are pinned on CUDA hosts for async copies."""
        assert tier in ("gpu", "cpu")
        if tier == "gpu":
            return torch.empty(nbytes, dtype=torch.uint8, device=self.compute)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda and pin)

    def new_stream(self) -> CudaStream | SimulatedStream | None:
        """A side stream for an I/O queue: CUDA's, a simulated copy lane, or None on a plain CPU."""
        if self.cuda:
            return CudaStream(self.compute)
        if self.simulated:
            self._streams += 1
            return SimulatedStream(seed=self._streams, thread_setup=self.enter_thread)
        return None

    def record_event(self):
        """An event after the compute issued so far (CUDA); None where compute is synchronous."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def synchronize(self) -> None:
        """Wait for the compute stream (CUDA); a no-op where compute is synchronous."""
        if self.cuda:
            torch.cuda.current_stream(self.compute).synchronize()


def _expandable_segments() -> None:
    """Let PyTorch's CUDA caching allocator grow segments in place instead of keeping blocks it cannot
    reuse for another size: on an H200 capped at 6 GiB the engine's transients left 0.9-1.7 GiB reserved
    but unallocated without it. Only before this process has reserved any GPU memory, and never over the
    user's own PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF."""
    if _ALLOCATOR_SET or "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    _ALLOCATOR_SET.append(True)
    if torch.cuda.is_initialized() and torch.cuda.memory_reserved() > 0:
        return
    setting = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    try:
        setting("expandable_segments:True")
    except RuntimeError as e:  # a build or platform without them: fragmentation is then the planner's margin
        log.info("CUDA expandable segments are not available here: %s", e)


_ALLOCATOR_SET: list[bool] = []


class OffloadSpaceError(OSError):
    """The disk tier has no room for an offload file, or a write to one failed: names the file."""


def _reserve(fd: int, nbytes: int) -> None:
    """Allocate a file's blocks now (posix_fallocate), so a full disk is met when the file is made,
    not at a write mid-run. Where the filesystem cannot (no fallocate and glibc's fallback refused,
    e.g. some network filesystems: EOPNOTSUPP/EINVAL) the file stays sparse: logged once per process."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        if not _UNRESERVED_WARNED:
            _UNRESERVED_WARNED.append(True)
            log.warning("this filesystem cannot reserve space for offload files (%s): a disk that fills up "
                        "during a run is met at a write, not when the files are made", e.strerror)


_UNRESERVED_WARNED: list[bool] = []


class DiskFile:
    """A file of `nbytes` on the disk tier, its space reserved when it is made, read and written at
    byte offsets. It is made new (O_EXCL, O_NOFOLLOW, 0600) inside the open folder `dir_fd`, so no file
    or link planted under its name is followed or reused. Failures name the file: an ENOSPC when it is
    made says how much was asked and how much is free."""

    def __init__(self, path: Path, nbytes: int, dir_fd: int):
        self.path = path
        self.nbytes = nbytes
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(path.name, flags, 0o600, dir_fd=dir_fd)
        try:
            os.ftruncate(self._fd, nbytes)
            if nbytes:
                _reserve(self._fd, nbytes)
        except OSError as e:
            self.close()
            os.unlink(path.name, dir_fd=dir_fd)
            free = os.fstatvfs(dir_fd)
            raise OffloadSpaceError(
                e.errno, f"disk tier: cannot reserve {nbytes / 2**20:.1f} MiB for offload file {path} "
                f"({e.strerror}; {free.f_bavail * free.f_frsize / 2**20:.1f} MiB free on that filesystem)") from None

    def write(self, offset: int, src: torch.Tensor) -> None:
        data = memoryview(as_bytes(src.contiguous()))
        assert offset + len(data) <= self.nbytes, (self.path, offset, len(data), self.nbytes)
        try:
            while data:
                written = os.pwrite(self._fd, data, offset)
                data, offset = data[written:], offset + written
        except OSError as e:
            raise OffloadSpaceError(e.errno, f"disk tier: writing offload file {self.path} at byte {offset} "
                                             f"failed: {e.strerror}") from None

    def read_into(self, offset: int, dst: torch.Tensor) -> None:
        view = memoryview(as_bytes(dst))
        assert offset + len(view) <= self.nbytes, (self.path, offset, len(view), self.nbytes)
        while view:
            try:
                got = os.preadv(self._fd, [view], offset)
            except OSError as e:
                raise OffloadSpaceError(e.errno, f"disk tier: reading offload file {self.path} at byte {offset} "
                                                 f"failed: {e.strerror}") from None
            if got == 0:
                raise OSError(f"unexpected end of offload file {self.path} at byte {offset}")
            view, offset = view[got:], offset + got

    def size_on_disk(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


OWNER_NAME = "owner.lock"  # in each engine's folder: its owner record, flock()ed for the engine's life
_OWNER_RECORD = "flexgen offload folder, uid {uid}, token {token}\n"
_OWNER_PATTERN = re.compile(r"^flexgen offload folder, uid (\d+), token [0-9a-f]{32}\n$")


class OffloadDir:
    """This engine's own folder `engine-<pid>-<random>` inside the offload base, removed on close, at
    interpreter exit, and on SIGTERM or SIGHUP (then the process dies of the signal: signals.py) or SIGINT.

    The base (`offload_dir`, default `<temp>/flexgen-offload-<uid>`) must be this user's private folder
    (private_dir.py): made 0700 when new, refused in one line when it is a symlink, another user's, or
    writable by others. The engine keeps it and its own folder open and makes every file relative to
    them, so renaming or replacing a path under the base afterwards redirects nothing.

    Ownership is a record and a lock, never a name or a PID: the engine's folder holds `owner.lock`,
    which says it was made by this program for this uid (with a random token) and is flock()ed for
    the engine's life; the OS drops the lock when the process dies however it dies (SIGKILL included).
    An engine opening the base removes the folders whose owner record is this user's and whose lock
    it can take, and nothing else: a folder of the user's own named like ours is kept. flock holds
    across PID namespaces (containers sharing a volume) and on NFS v4; PIDs say nothing there. A folder
    gets its record and lock before its `engine-` name (it is `.making-…` until then)."""

    def __init__(self, root: str | os.PathLike | None):
        base = Path(root).expanduser() if root is not None else user_temp_folder("flexgen-offload")
        self._base_fd = open_private_folder(base, "offload_dir")
        self.base = base
        self._fd = self._lock_fd = None
        try:
            self.stale_removed = _remove_stale(base, self._base_fd)
            name = f"engine-{os.getpid()}-{secrets.token_hex(6)}"
            os.mkdir(".making-" + name, 0o700, dir_fd=self._base_fd)
            self._fd = os.open(".making-" + name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=self._base_fd)
            self._lock_fd = os.open(OWNER_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                    0o600, dir_fd=self._fd)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(self._lock_fd, _OWNER_RECORD.format(uid=os.geteuid(), token=secrets.token_hex(16)).encode())
            os.rename(".making-" + name, name, src_dir_fd=self._base_fd, dst_dir_fd=self._base_fd)
        except BaseException:
            self._close_fds()
            raise
        self.path = base / name
        self.files: list[DiskFile] = []
        _LIVE.add(self)
        install_signal_handlers()

    def file(self, name: str, nbytes: int) -> DiskFile:
        f = DiskFile(self.path / name, nbytes, self._fd)
        self.files.append(f)
        return f

    def release(self, f: DiskFile) -> None:
        f.close()
        self.files.remove(f)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f.path.name, dir_fd=self._fd)

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files.clear()
        if self._fd is not None:
            _remove_folder(self.path.name, self._base_fd)
        self._close_fds()  # the lock last: no one may take the folder while it is removed
        _LIVE.discard(self)

    def _close_fds(self) -> None:
        for attr in ("_fd", "_lock_fd", "_base_fd"):
            fd = getattr(self, attr, None)
            if fd is not None:
                os.close(fd)
                setattr(self, attr, None)


def _remove_folder(name: str, base_fd: int) -> bool:
    """Remove the folder `name` of the open base, not following any symlink inside; True if it is gone."""
    shutil.rmtree(name, dir_fd=base_fd, ignore_errors=True)
    try:
        os.stat(name, dir_fd=base_fd, follow_symlinks=False)
    except FileNotFoundError:
        return True
    return False


def _abandoned(name: str, base_fd: int) -> int | None:
    """A lock fd on the folder `name` if it is an engine folder of this user's whose engine is gone
    (its owner record is ours and its lock is free), else None."""
    try:
        st = os.stat(name, dir_fd=base_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return None
        folder = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=base_fd)
    except OSError:
        return None
    try:
        lock = os.open(OWNER_NAME, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except OSError:  # no record: not a folder this program made
        return None
    finally:
        os.close(folder)
    try:
        lst = os.fstat(lock)
        record = os.pread(lock, 200, 0).decode("ascii", "replace") if stat.S_ISREG(lst.st_mode) else ""
        match = _OWNER_PATTERN.match(record)
        if lst.st_uid != os.geteuid() or not match or int(match.group(1)) != os.geteuid():
            os.close(lock)
            return None
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: a live engine, in whatever process namespace
        os.close(lock)
        return None
    return lock


def _remove_stale(base: Path, base_fd: int) -> list[Path]:
    """Remove the engine folders of this user's that no live engine holds; log each one removed."""
    removed = []
    for name in sorted(os.listdir(base_fd)):
        lock = _abandoned(name, base_fd)
        if lock is None:
            continue
        try:
            gone = _remove_folder(name, base_fd)
        finally:
            os.close(lock)
        if gone:
            removed.append(base / name)
            log.warning("removed offload files left by a process that no longer runs: %s", base / name)
    return removed


# Offload dirs of this process still open: closed at exit and on SIGTERM so no files are left behind.
_LIVE: "weakref.WeakSet[OffloadDir]" = weakref.WeakSet()


def _close_live() -> None:
    for offload in list(_LIVE):
        try:
            offload.close()
        except OSError as e:  # one folder's trouble does not keep the others
            log.warning("could not remove offload folder %s: %s", offload.path, e)


atexit.register(_close_live)
register_cleanup(_close_live)


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


__all__ = ["Devices", "DiskFile", "OffloadDir", "OffloadSpaceError", "Slots", "TORCH_DTYPES", "as_bytes", "torch_dtype", "view_as"]
