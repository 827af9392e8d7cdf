"""Ending the process on SIGTERM or SIGHUP the way Ctrl-C does: as an exception, so `with` blocks,
`finally` clauses and atexit handlers run and the engine's offload folder is removed.

Torch-free, so the HELM plugin can install the handlers when `helm-run` imports it (in the main
thread, the only one Python lets set handlers; HELM builds clients, and so engines, in worker threads).
"""

from __future__ import annotations

import signal
import threading

# SIGHUP: the terminal went away (an ssh session dropped). SIGINT is Python's KeyboardInterrupt already.
CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into SystemExit(128 + signal number) unless the program handles them
    already; a no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in CLEANUP_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _exit_on_signal)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)
