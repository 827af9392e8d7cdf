"""Gathers concurrent single requests into engine batches.

HELM calls `make_request` once per request, from up to `-n` threads at once; FlexGen's throughput
comes from large blocks (gpu_batch_size x num_gpu_batches sequences, paper Sec. 4). A `Batcher`
owns one engine's worker thread: callers `submit` a prompt with its `BatchSettings` and block; the
worker runs one `engine.generate` call per batch and hands each caller its own result.

Rules:
- Only requests with equal `BatchSettings` (every argument of `engine.generate` except the prompts)
  share a call, so settings from different runs never mix.
- A group is run when it fills a block (counting `num_completions` sequences per prompt), when no
  request has joined it for `idle_wait_s` (the callers are all waiting: nothing more will come),
  or when its oldest request has waited `max_wait_s`. Both clocks restart when a batch finishes:
  its callers come back with their next requests within moments, and those should join the next
  batch rather than miss it.
- Requests whose prompts start like the oldest one's (its first `PREFIX_KEY_TOKENS` tokens: a HELM
  run entry's instructions and in-context examples) go together, without requests of other prefixes:
  the engine computes the prefix a call's prompts share once, and a call that mixes prefixes shares
  none.
- Inside a batch, prompts are sorted by length to cut padding; when more requests wait than fit,
  the block of similar lengths that contains the oldest request is taken, so none starves.
- Results are handed back as soon as their batch finishes (the caller writes HELM's cache then).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from flexgen_core.prefix import SHARED_PREFIX_MIN_TOKENS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSettings:
    """Everything one `engine.generate` call shares across its prompts (hashable: the group key)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    num_completions: int
    stop: tuple[tuple[int, ...], ...]
    echo_prompt: bool
    top_k_logprobs: int

    def generate_kwargs(self) -> dict[str, Any]:
        return dict(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            num_completions=self.num_completions,
            stop=[list(sequence) for sequence in self.stop] or None,
            echo_prompt=self.echo_prompt,
            top_k_logprobs=self.top_k_logprobs,
        )


@dataclass(frozen=True)
class BatchOutcome:
    """One request's share of a finished batch."""

    result: Any  # the engine's per-prompt result
    batch_size: int  # prompts in the engine call
    batch_time_s: float  # wall time of the engine call


@dataclass
class _Pending:
    prompt: list[int]
    seed: int | None  # per prompt: sampling must not depend on the batch a request lands in
    settings: BatchSettings
    arrived_s: float
    future: Future = field(default_factory=Future)


# run_batch(settings, prompts, seeds) -> one result per prompt, in order.
class BatcherClosed(RuntimeError):
    """The batcher was closed (its engine unloaded) before the request could be queued."""


RunBatch = Callable[[BatchSettings, Sequence[Sequence[int]], Sequence["int | None"]], Sequence[Any]]


# Prompts that agree on this many leading tokens are taken to share a prefix (a shorter common prefix
# is not worth sharing: flexgen_core/prefix.py).
PREFIX_KEY_TOKENS = SHARED_PREFIX_MIN_TOKENS


def choose_batch(pending: Sequence[_Pending], max_prompts: int) -> list[_Pending]:
    """At most `max_prompts` of one group's `pending` requests, sorted by prompt length.

    Only those that share the oldest request's prefix, if it has one that others share. Of those, all
    if they fit; otherwise the run of `max_prompts` consecutive requests (in length order) that
    contains the oldest request and spans the smallest range of lengths.
    """
    oldest = min(pending, key=lambda item: item.arrived_s)
    if len(oldest.prompt) > PREFIX_KEY_TOKENS:
        key = oldest.prompt[:PREFIX_KEY_TOKENS]
        same = [item for item in pending if len(item.prompt) > PREFIX_KEY_TOKENS and item.prompt[:PREFIX_KEY_TOKENS] == key]
        if len(same) > 1:
            pending = same
    by_length = sorted(pending, key=lambda item: (len(item.prompt), item.arrived_s))
    if len(by_length) <= max_prompts:
        return by_length
    oldest_idx = min(range(len(by_length)), key=lambda idx: by_length[idx].arrived_s)
    first_start = max(0, oldest_idx - max_prompts + 1)
    last_start = min(oldest_idx, len(by_length) - max_prompts)
    best_start = min(
        range(first_start, last_start + 1),
        key=lambda start: len(by_length[start + max_prompts - 1].prompt) - len(by_length[start].prompt),
    )
    return by_length[best_start : best_start + max_prompts]


class Batcher:
    """One worker thread that turns concurrent `submit` calls into `run_batch` calls.

    `run_batch(settings, prompts, seeds)` returns one result per prompt, in order; it is only ever
    called from the worker thread, one call at a time.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        block_size: int,
        idle_wait_s: float = 0.05,
        max_wait_s: float = 2.0,
        name: str = "flexgen-batcher",
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if idle_wait_s < 0 or max_wait_s < idle_wait_s:
            raise ValueError(f"need 0 <= idle_wait_s <= max_wait_s, got {idle_wait_s} and {max_wait_s}")
        self._run_batch = run_batch
        self.block_size = block_size
        self.idle_wait_s = idle_wait_s
        self.max_wait_s = max_wait_s
        self._name = name
        self._groups: dict[BatchSettings, list[_Pending]] = {}
        self._last_arrival_s: dict[BatchSettings, float] = {}
        self._condition = threading.Condition()
        self._worker: threading.Thread | None = None
        self._running = False  # a batch is in run_batch
        self._last_batch_end_s = float("-inf")
        self._closed = False

    def submit(self, prompt: Sequence[int], settings: BatchSettings, seed: int | None = None) -> BatchOutcome:
        """Queue one prompt and block until its batch has run; re-raises the batch's exception."""
        item = _Pending(list(prompt), seed, settings, time.monotonic())
        with self._condition:
            if self._closed:
                raise BatcherClosed(f"{self._name} is closed")
            self._groups.setdefault(settings, []).append(item)
            self._last_arrival_s[settings] = item.arrived_s
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._worker.start()
            self._condition.notify_all()
        return item.future.result()

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running."""
        with self._condition:
            return not self._groups and not self._running

    def close(self) -> None:
        """Run what is queued, then stop the worker."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            worker = self._worker
        if worker is not None:
            worker.join()

    def _prompts_per_block(self, settings: BatchSettings) -> int:
        return max(1, self.block_size // settings.num_completions)

    def _next_batch(self, now_s: float) -> tuple[list[_Pending], float | None]:
        """A ready batch (removed from the queue), or none and how long to wait for one."""
        ready: list[tuple[float, BatchSettings]] = []
        wait_s: float | None = None
        for settings, items in self._groups.items():
            oldest_s = min(item.arrived_s for item in items)
            full = len(items) >= self._prompts_per_block(settings)
            last_event_s = max(self._last_arrival_s[settings], self._last_batch_end_s)
            waiting_since_s = max(oldest_s, self._last_batch_end_s)
            deadline_s = min(last_event_s + self.idle_wait_s, waiting_since_s + self.max_wait_s)
            if full or self._closed or now_s >= deadline_s:
                ready.append((oldest_s, settings))
            else:
                wait_s = deadline_s - now_s if wait_s is None else min(wait_s, deadline_s - now_s)
        if not ready:
            return [], wait_s
        _, settings = min(ready, key=lambda entry: entry[0])  # the group waiting longest goes first
        items = self._groups[settings]
        batch = choose_batch(items, self._prompts_per_block(settings))
        chosen = {id(item) for item in batch}
        remaining = [item for item in items if id(item) not in chosen]
        if remaining:
            self._groups[settings] = remaining
        else:
            del self._groups[settings]
            del self._last_arrival_s[settings]
        return batch, None

    def _work(self) -> None:
        while True:
            with self._condition:
                while True:
                    batch, wait_s = self._next_batch(time.monotonic())
                    if batch:
                        self._running = True
                        break
                    if self._closed and not self._groups:
                        return
                    self._condition.wait(timeout=wait_s)
            try:
                self._run(batch)
            finally:
                with self._condition:
                    self._running = False
                    self._last_batch_end_s = time.monotonic()

    def _run(self, batch: list[_Pending]) -> None:
        settings = batch[0].settings
        started_s = time.perf_counter()
        try:
            results = self._run_batch(settings, [item.prompt for item in batch], [item.seed for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} prompts")
        except Exception as error:  # handed to every waiting caller, not swallowed
            logger.warning("Batch of %d prompts failed: %s", len(batch), error)
            for item in batch:
                item.future.set_exception(error)
            return
        batch_time_s = time.perf_counter() - started_s
        logger.info("Ran a batch of %d prompts in %.2f s", len(batch), batch_time_s)
        for item, result in zip(batch, results):
            item.future.set_result(BatchOutcome(result, len(batch), batch_time_s))
