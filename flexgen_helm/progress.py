"""Progress of the requests HELM sends one FlexGen deployment, in HELM's log.

HELM's executor shows no progress of its own outside a terminal, and its requests reach a client one
by one, so the client counts them: after each engine batch one line with the requests answered of
those seen so far (HELM hands them over `-n` at a time: with `-n` at least the run entry's size, that
is the run entry's total), the batch's time and throughput and an ETA for the requests still waiting;
and once requests stop coming for `quiet_s` (HELM has moved on to the run entry's metrics) one summary
line: requests computed and from HELM's cache, batches and their mean and largest size, prefill and
decode seconds, tokens generated and tokens/s.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


@dataclass
class _Burst:
    """Requests since the last summary (one run entry, as HELM sends them)."""

    started_s: float
    seen: int = 0
    cached: int = 0
    failed: int = 0
    computed: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    compute_s: float = 0.0
    stats_before: Mapping[str, Any] | None = None
    stats_after: Mapping[str, Any] | None = None
    lossy: tuple[str, ...] = ()  # what the engine stored in 4 bits for this burst's batches


class RunProgress:
    """Counts one deployment's requests; logs a line per batch and a summary per burst of requests."""

    def __init__(self, name: str, log: Callable[[str], None], quiet_s: float = 1.0) -> None:
        self.name = name
        self.quiet_s = quiet_s
        self._log = log
        self._lock = threading.Condition()
        self._burst: _Burst | None = None
        self._last_event_s = 0.0
        self._watcher: threading.Thread | None = None

    # -- events ------------------------------------------------------------------------------------
    def request_seen(self) -> None:
        with self._lock:
            self._touch().seen += 1

    def answered_from_cache(self) -> None:
        with self._lock:
            self._touch().cached += 1

    def request_failed(self) -> None:
        with self._lock:
            self._touch().failed += 1

    def request_computed(self) -> None:
        """A request answered without an engine batch (nothing to generate or score)."""
        with self._lock:
            self._touch().computed += 1

    def batch_done(self, prompts: int, what: str, batch_s: float, stats_before: Mapping[str, Any],
                   stats_after: Mapping[str, Any], lossy: Sequence[str] = ()) -> None:
        """An engine batch of `prompts` requests finished; `stats_*` are the engine's counters
        (RunStats.as_dict()) around it; `lossy`: what its policy stores in 4 bits (Policy.lossy)."""
        with self._lock:
            burst = self._touch()
            burst.lossy = tuple(sorted(set(burst.lossy) | set(lossy)))
            burst.computed += prompts
            burst.batch_sizes.append(prompts)
            burst.compute_s += batch_s
            if burst.stats_before is None:
                burst.stats_before = stats_before
            burst.stats_after = stats_after
            done = burst.computed + burst.cached + burst.failed
            waiting = max(0, burst.seen - done)
            tokens, kind = _counted(stats_before, stats_after)
            eta = f"ETA {waiting * burst.compute_s / burst.computed:.0f} s for {waiting} waiting" if waiting else "none waiting"
            line = (f"FlexGen: [{done}/{burst.seen} requests to {self.name}] batch of {what} in {batch_s:.2f} s, "
                    f"{tokens / batch_s if batch_s else 0:.1f} {kind}/s; {eta}")
        self._log(line)

    def flush(self) -> None:
        """Log the summary of the requests since the last one now (at exit)."""
        with self._lock:
            burst, self._burst = self._burst, None
        if burst is not None:
            self._log(self._summary(burst))

    # -- internals -----------------------------------------------------------------------------------
    def _touch(self) -> _Burst:
        now_s = time.monotonic()
        self._last_event_s = now_s
        if self._burst is None:
            self._burst = _Burst(started_s=now_s)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name=f"flexgen-progress:{self.name}", daemon=True)
            self._watcher.start()
        self._lock.notify_all()
        return self._burst

    def _watch(self) -> None:
        """Logs a burst's summary once nothing has happened for `quiet_s`."""
        while True:
            with self._lock:
                while self._burst is None:
                    self._lock.wait()
                idle_s = time.monotonic() - self._last_event_s
                burst = self._burst
                answered = burst.computed + burst.cached + burst.failed
                if idle_s < self.quiet_s or answered < burst.seen:  # still coming, or still computing
                    self._lock.wait(timeout=max(self.quiet_s - idle_s, 0.05))
                    continue
                self._burst = None
            self._log(self._summary(burst))

    def _summary(self, burst: _Burst) -> str:
        wall_s = self._last_event_s - burst.started_s
        parts = [f"FlexGen: {burst.seen} requests to {self.name} in {wall_s:.1f} s: {burst.computed} computed"]
        if burst.batch_sizes:
            sizes = burst.batch_sizes
            parts[0] += (f" in {len(sizes)} batches (mean {sum(sizes) / len(sizes):.1f}, largest {max(sizes)} "
                         "requests)")
        parts.append(f"{burst.cached} from HELM's cache")
        if burst.batch_sizes:
            parts.append(f"LOSSY results: 4-bit {' and '.join(burst.lossy)}" if burst.lossy
                         else "exact results (no compression)")
        if burst.failed:
            parts.append(f"{burst.failed} failed")
        if burst.stats_before is not None and burst.stats_after is not None:
            delta = {k: burst.stats_after[k] - burst.stats_before[k] for k in ("prefill_s", "decode_s")}
            tokens, kind = _counted(burst.stats_before, burst.stats_after)
            parts.append(f"prefill {delta['prefill_s']:.1f} s, decode {delta['decode_s']:.1f} s, "
                         f"{tokens} {'tokens generated' if kind == 'tokens' else kind} "
                         f"({tokens / max(wall_s, 1e-9):.1f} {kind}/s over the wall time)")
        return "; ".join(parts)


def _counted(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[int, str]:
    """What the engine did between two of its counters' snapshots: tokens generated, or, for scoring
    (max_tokens 0 with echo, which generates nothing), the prompt tokens it read."""
    generated = after["generated_tokens"] - before["generated_tokens"]
    if generated:
        return generated, "tokens"
    read = after["prefill_tokens"] - before["prefill_tokens"] + after["prefix_tokens"] - before["prefix_tokens"]
    return read, "prompt tokens scored"
