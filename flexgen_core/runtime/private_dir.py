"""Folders of this user's own on a shared machine: offload files (weights and users' prompts as KV cache)
and benchmark output.

A shared temp folder lets any local user pre-create a name, make it writable to all, or put a symlink in
its place. So a folder we write into is opened once, without following a symlink, and checked to be a
real folder owned by this user that no one else may write to; files inside are then made relative to
that open folder (`dir_fd`), with O_NOFOLLOW and O_EXCL, so nothing planted there is followed or reused.
The default names carry the user id (`flexgen-offload-<uid>`), so one user's folder never stops another.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
import tempfile
from pathlib import Path


class UnsafeFolderError(ValueError):
    """A folder we were asked to write into is not this user's private folder: says which and why."""


def user_temp_folder(stem: str) -> Path:
    """`<temp folder>/<stem>-<uid>`: this user's default folder for `stem` (e.g. "flexgen-offload")."""
    return Path(tempfile.gettempdir()) / f"{stem}-{os.geteuid()}"


def _writable_by_others(st: os.stat_result) -> str | None:
    """Why a folder's mode lets another user write into it, or None."""
    if st.st_mode & stat.S_IWOTH:
        return f"is writable by every user (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_mode & stat.S_IWGRP:
        # A user-private group (the user's own primary group, no other members) is not "others".
        try:
            group = grp.getgrgid(st.st_gid)
            me = pwd.getpwuid(os.geteuid())
        except KeyError:
            return f"is writable by group {st.st_gid} (mode {stat.S_IMODE(st.st_mode):04o})"
        if not (st.st_gid == me.pw_gid and set(group.gr_mem) <= {me.pw_name}):
            return f"is writable by group {group.gr_name!r} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_private(fd: int, path: Path, what: str) -> None:
    """Raise UnsafeFolderError unless the open folder `fd` is a folder this user owns and only it may
    write to."""
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeFolderError(f"{what} {str(path)!r} is not a folder")
    if st.st_uid != os.geteuid():
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        raise UnsafeFolderError(f"{what} {str(path)!r} belongs to user {owner!r}, not to you: choose a folder "
                                f"of your own")
    why = _writable_by_others(st)
    if why:
        raise UnsafeFolderError(f"{what} {str(path)!r} {why}: other users could replace its files; "
                                f"run `chmod go-w {path}` or choose a folder of your own")


def open_private_folder(path: str | os.PathLike, what: str) -> int:
    """An open fd (O_DIRECTORY) of `path`, made 0700 if it does not exist, after checking it is this
    user's private folder. The last component is never followed if it is a symlink. The caller closes
    the fd. Errors are one line naming the folder (UnsafeFolderError, a ValueError)."""
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UnsafeFolderError(f"{what} {str(path)!r} cannot be created: {str(path.parent)!r} is not a "
                                f"folder") from None
    except OSError as e:
        raise UnsafeFolderError(f"{what} {str(path)!r} cannot be created: {e.strerror}") from None
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise UnsafeFolderError(f"{what} {str(path)!r} cannot be created: {e.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise UnsafeFolderError(f"{what} {str(path)!r} is a symbolic link, which another user may have "
                                    f"planted: choose a folder of your own") from None
        reason = "is not a folder" if e.errno == errno.ENOTDIR else f"cannot be opened: {e.strerror}"
        raise UnsafeFolderError(f"{what} {str(path)!r} {reason}") from None
    try:
        check_private(fd, path, what)
        if os.fstat(fd).st_mode & 0o300 != 0o300 and os.geteuid() != 0:
            raise UnsafeFolderError(f"{what} {str(path)!r} is not writable (mode "
                                    f"{stat.S_IMODE(os.fstat(fd).st_mode):04o})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def private_folder(path: str | os.PathLike, what: str) -> Path:
    """`path`, made or checked as by `open_private_folder`, for writers that take paths."""
    os.close(open_private_folder(path, what))
    return Path(path).expanduser()


__all__ = ["UnsafeFolderError", "check_private", "open_private_folder", "private_folder", "user_temp_folder"]
