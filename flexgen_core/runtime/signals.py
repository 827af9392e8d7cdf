"""Ending the process on SIGTERM or SIGHUP as the signal asks, after removing what the engine made.

The handler runs the registered cleanups (the engines' offload folders: runtime/storage.py), then
restores the signal's default action and sends the signal again, so the process dies of it and its
parent sees that signal (a shell's 143 for SIGTERM): a test runner, a batch system or `timeout` is not
told that the process ended on its own, and nothing catches it as an exception and carries on.
SIGINT stays Python's KeyboardInterrupt, whose unwinding runs the same cleanups.

Torch-free, so the HELM plugin can install the handlers when `helm-run` imports it (in the main
thread, the only one Python lets set handlers; HELM builds clients, and so engines, in worker threads).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

# SIGHUP: the terminal went away (an ssh session dropped). SIGINT is Python's KeyboardInterrupt already.
CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_CLEANUPS: list[Callable[[], None]] = []


def register_cleanup(cleanup: Callable[[], None]) -> None:
    """Run `cleanup` when a handled signal ends the process (once per callable)."""
    if cleanup not in _CLEANUPS:
        _CLEANUPS.append(cleanup)


def install_signal_handlers() -> None:
    """End the process on SIGTERM and SIGHUP after the cleanups, unless the program handles them
    already (or ignores them, as under `nohup`); a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in CLEANUP_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _end_on_signal)


def _end_on_signal(signum, frame):
    signal.signal(signum, signal.SIG_IGN)  # a second signal meanwhile does not cut the cleanup short
    for cleanup in list(_CLEANUPS):
        try:
            cleanup()
        except Exception:  # noqa: BLE001 - the process is ending as asked; the rest still cleans up
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
