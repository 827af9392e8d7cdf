"""The engines behind FlexGenClient: one per (checkpoint, policy, placement) in the process, shared by
every client instance HELM builds for that deployment, each with its batcher and its progress lines.

`EngineKey` says which engine a deployment needs; `EngineRegistry` (`ENGINES`) loads it on first use
and closes every engine at exit; an `EngineHandle` runs the batcher's batches on it, re-planning
`policy: auto` when a batch differs materially from what it was planned for.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from helm.common.hierarchical_logger import hlog

from flexgen_core import Policy
from flexgen_core.policy import SWITCHES
from flexgen_helm.batcher import Batcher, BatchSettings
from flexgen_helm.progress import RunProgress


class ConfigurationError(ValueError):
    """The deployment's arguments cannot work: retrying is pointless and the run should stop."""


class RequestRejected(ValueError):
    """This request cannot succeed (e.g. too long for the model); the run goes on without it."""


@dataclass(frozen=True)
class EngineKey:
    """What identifies one loaded engine (and its batcher) in this process."""

    model_path: str
    policy: Policy | str  # a Policy, or "auto"
    offload_dir: str
    device: str
    dtype: str
    batch_wait_s: float
    compress: str = "never"  # with policy "auto": may it choose 4-bit weights or cache (COMPRESS_CHOICES)


class EngineHandle:
    """An engine and the batcher that feeds it. With `policy: auto` the engine is planned and loaded
    at the first batch, for that batch's shape: its prompt and generation lengths, its number of
    sequences and the prefix its prompts share (a HELM run entry's instructions and examples), and
    planned again for later batches of another shape; each batch takes everything waiting."""

    def __init__(self, key: EngineKey) -> None:
        self.key = key
        self.engine: Any = None
        self.planned_for: dict[str, int] = {}  # policy "auto": the shape hints of the current plan
        if key.policy == "auto":
            self.max_positions = _read_max_positions(key.model_path)
            block_size = UNPLANNED_BLOCK_SIZE
        else:
            self.engine = _load_engine(key)
            self.max_positions = self.engine.config.max_positions
            block_size = self.engine.policy.block_size
        self.batcher = Batcher(
            self._run_batch,
            block_size=block_size,
            idle_wait_s=key.batch_wait_s,
            max_wait_s=20 * key.batch_wait_s,
            name=f"flexgen-batcher:{os.path.basename(key.model_path.rstrip('/'))}",
        )

    def _run_batch(self, settings: BatchSettings, prompts: Sequence[Sequence[int]], seeds: Sequence[int | None]):
        if self.key.policy == "auto":
            self._plan_for(settings, prompts)
        started_s, before = time.perf_counter(), self.engine.stats.as_dict()
        results = self.engine.generate(prompts, seed=list(seeds), **settings.generate_kwargs())
        what = f"{len(prompts)} prompts (x{settings.num_completions}, {settings.max_new_tokens} new tokens)"
        PROGRESS.get(self.key).batch_done(len(prompts), what, time.perf_counter() - started_s, before,
                                          self.engine.stats.as_dict(), lossy=self.engine.policy.lossy)
        return results

    def _plan_for(self, settings: BatchSettings, prompts: Sequence[Sequence[int]]) -> None:
        """policy "auto": plan for the first batch, then again whenever a batch's shape differs
        materially from the one planned for (a new run entry: other prompt lengths, max_tokens or
        more requests waiting), keeping the loaded weights unless the planner rates a move worth it."""
        from flexgen_core.prefix import sharable_prefix_len

        hints = dict(prompt_len_hint=max(map(len, prompts)), gen_len_hint=max(1, settings.max_new_tokens),
                     num_prompts_hint=len(prompts) * settings.num_completions,
                     shared_prefix_len_hint=sharable_prefix_len(prompts))
        if self.engine is None:
            self.engine = _load_engine(self.key, hints)
        elif _materially_different(hints, self.planned_for):
            before = self.engine.policy
            policy = self.engine.replan(**hints)
            if policy.keeps_weights(before):
                hlog(f"FlexGen: re-planned {describe_policy(policy)} for {hints} (weights kept as loaded)")
            else:
                self.engine.close()
                self.engine = None
                self.engine = _load_engine(self.key, hints)
        else:
            return
        self.planned_for = hints

    def close(self) -> None:
        self.batcher.close()
        if self.engine is not None:
            self.engine.close()


# With policy "auto", a batch takes every request waiting (up to this many sequences): the plan is made
# for what waits (HELM sends up to -n requests at once), and the engine runs them in blocks of its size.
UNPLANNED_BLOCK_SIZE = 4096


class EngineRegistry:
    """Process-wide cache of loaded engines (HELM creates client instances concurrently, unlocked).

    Loading a checkpoint under a new policy first closes the idle engines already loaded from that
    checkpoint: one 30B model in RAM at a time, not one per deployment (HELM runs one run spec
    after another). A later request for a closed one reloads it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[EngineKey, EngineHandle] = {}

    def get(self, key: EngineKey) -> EngineHandle:
        with self._lock:
            handle = self._handles.get(key)
            if handle is not None:
                return handle
            for other_key, other in list(self._handles.items()):
                if other_key.model_path == key.model_path and other.batcher.idle:
                    hlog(f"FlexGen: unloading {other_key.model_path} (policy {describe_policy(other_key.policy)})")
                    del self._handles[other_key]
                    other.close()
            handle = EngineHandle(key)
            self._handles[key] = handle
            return handle

    def close_all(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle.close()


ENGINES = EngineRegistry()
atexit.register(ENGINES.close_all)  # releases the engines' offload files


class ProgressRegistry:
    """One RunProgress per engine key, made without loading the engine (cache hits count too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress: dict[EngineKey, RunProgress] = {}

    def get(self, key: EngineKey, deployment: str | None = None) -> RunProgress:
        """The progress of `key`'s requests, named after the deployment that first asks for it."""
        with self._lock:
            if key not in self._progress:
                self._progress[key] = RunProgress(deployment or os.path.basename(key.model_path.rstrip("/")), hlog)
            return self._progress[key]

    def flush_all(self) -> None:
        with self._lock:
            progress = list(self._progress.values())
        for item in progress:
            item.flush()


PROGRESS = ProgressRegistry()
atexit.register(PROGRESS.flush_all)  # registered after ENGINES.close_all: runs before it


# policy "auto" plans again for a batch whose max_tokens differ from those planned for, whose shared
# prefix is this much longer or shorter (another run entry's instructions and examples), whose prompts
# are this much longer (shorter ones fit the plan) or of which this many times as many sequences wait.
REPLAN_LENGTH_RATIO = 1.25
REPLAN_COUNT_RATIO = 2.0


def _materially_different(hints: Mapping[str, int], planned: Mapping[str, int]) -> bool:
    def ratio(a: int, b: int) -> float:
        return max(a, b) / max(min(a, b), 1)

    return (hints["gen_len_hint"] != planned["gen_len_hint"]
            or hints["prompt_len_hint"] > REPLAN_LENGTH_RATIO * planned["prompt_len_hint"]
            or ratio(hints["shared_prefix_len_hint"], planned["shared_prefix_len_hint"]) > REPLAN_LENGTH_RATIO
            or hints["num_prompts_hint"] > REPLAN_COUNT_RATIO * planned["num_prompts_hint"])


def describe_policy(policy: Policy | str) -> str:
    """One line for logs: batch shape, the paper's six percentages, the switches that are on."""
    if isinstance(policy, str):
        return policy
    switches = "+".join(s.name for s in SWITCHES if s.shown and getattr(policy, s.name)) or "no switches"
    percent = " ".join(str(value) for value in policy.percent)
    return f"{policy.gpu_batch_size}x{policy.num_gpu_batches} blocks, percent {percent}, {switches}"


def _load_engine(key: EngineKey, hints: Mapping[str, int] | None = None) -> Any:
    from flexgen_core import Engine

    description = f"{key.model_path} (policy {describe_policy(key.policy)}; device {key.device}, {key.dtype})"
    hlog(f"FlexGen: loading {description}")
    started_s = time.perf_counter()
    try:
        auto = {"compress": key.compress} if key.policy == "auto" else {}
        engine = Engine.from_pretrained(
            key.model_path, policy=key.policy, offload_dir=key.offload_dir, device=key.device, dtype=key.dtype,
            **auto, **(hints or {}),
        )
    except (OSError, ValueError, TypeError) as error:
        raise ConfigurationError(f"cannot load {key.model_path!r}: {error}") from error
    hlog(f"FlexGen: loaded {key.model_path} in {time.perf_counter() - started_s:.1f} s")
    if key.policy == "auto":
        lossy = engine.policy.lossy
        note = f"; LOSSY: 4-bit {' and '.join(lossy)} (compress: allow)" if lossy else "; exact"
        hlog(f"FlexGen: policy auto planned {describe_policy(engine.policy)} for {hints}{note}")
    return engine


def _read_max_positions(model_path: str) -> int:
    from flexgen_core.engine import read_model

    try:
        return read_model(model_path)[2].max_positions
    except (OSError, ValueError, TypeError) as error:
        raise ConfigurationError(f"cannot load {model_path!r}: {error}") from error
