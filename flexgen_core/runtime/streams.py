"""Copy streams: where host <-> device copies run, and how the compute waits for them.

On CUDA a copy stream is a `torch.cuda.Stream`: the copies and kernels issued under it run in issue
order on the device, asynchronously to the host thread that issued them; `synchronize()` waits for
them and `wait_event(e)` orders them after the compute recorded in `e`.

The simulated device (`Devices("simulated")`, for tests on CPU-only hosts) keeps that contract with a
copy lane: one thread per stream runs each copy, and each stream-ordered operation after it, later --
after a random delay -- in issue order. A job that forgets to wait for its copies, or a buffer reused
while a copy into or out of it is still queued, then reads or writes the wrong bytes, and the parity
tests see it, instead of a user's GPU silently computing on half-copied data.

Code that moves data calls `copy_(dst, src)` (never `tensor.copy_(..., non_blocking=True)` itself),
and runs what consumes copied data inside the same job through `stream_ordered(fn, ...)`; with no
simulated stream active both are plain calls.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

_active = threading.local()  # .stream: the SimulatedStream this thread issues into, if any

# The random delay before each queued operation of a simulated stream: most wait up to SHORT_DELAY_S;
# one in STALL_EVERY stalls for up to STALL_S (a copy engine busy with other traffic), so that a copy
# can land long after later work on other streams -- the window in which a buffer reused too early
# is overwritten. Long enough that a missing wait almost surely shows, short enough for the suite.
SHORT_DELAY_S = 1e-3
STALL_S = 20e-3
STALL_EVERY = 25


class CudaStream:
    """A side CUDA stream for one I/O queue."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device)

    @contextmanager
    def active(self) -> Iterator[None]:
        with torch.cuda.stream(self.stream):
            yield

    def wait_event(self, event) -> None:
        if event is not None:
            self.stream.wait_event(event)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        pass


class SimulatedStream:
    """A copy lane: operations queued under `active()` run later, in order, on the lane's thread."""

    def __init__(self, seed: int, thread_setup: Callable[[], None] = lambda: None):
        self._thread_setup = thread_setup  # run first on the lane's thread
        self._rng = random.Random(seed)  # used by the lane thread only
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="flexgen-simulated-copy", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        self._thread_setup()
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                time.sleep(self._delay_s())
                if self._error is None:  # after a failure, later operations are skipped like a faulted stream's
                    job()
            except BaseException as e:  # re-raised by synchronize(), on the thread that waits
                self._error = e
            finally:
                self._jobs.task_done()

    def _delay_s(self) -> float:
        if self._rng.randrange(STALL_EVERY) == 0:
            return self._rng.uniform(SHORT_DELAY_S, STALL_S)
        return self._rng.uniform(0.0, SHORT_DELAY_S)

    def enqueue(self, fn: Callable[[], object]) -> None:
        self._jobs.put(fn)

    @contextmanager
    def active(self) -> Iterator[None]:
        previous = getattr(_active, "stream", None)
        _active.stream = self
        try:
            yield
        finally:
            _active.stream = previous

    def wait_event(self, event) -> None:
        """Compute on the simulated device runs synchronously on its thread: recorded work is done."""

    def synchronize(self) -> None:
        self._jobs.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


def copy_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy `src` into `dst` on the active stream: asynchronous on CUDA (pinned host memory) and on a
    simulated stream, where it lands later; the caller's stream must be synchronized before use."""
    stream = getattr(_active, "stream", None)
    if stream is not None:
        stream.enqueue(lambda: dst.copy_(src))
        return dst
    return dst.copy_(src, non_blocking=True)


def stream_ordered(fn: Callable[..., object], *args, **kwargs) -> None:
    """Run `fn` after the copies already issued on the active stream (on CUDA, kernels are launched in
    stream order anyway). `fn` must write its result into a buffer the caller already holds."""
    stream = getattr(_active, "stream", None)
    if stream is not None:
        stream.enqueue(lambda: fn(*args, **kwargs))
    else:
        fn(*args, **kwargs)
