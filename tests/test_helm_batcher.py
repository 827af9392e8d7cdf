"""The batcher's own contract, engine-agnostic (it takes any `run_batch` function): which requests
share a call, in what order, and when a partial batch goes. The engine behind it is exercised by
test_helm_client.py and the helm-run tests."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from flexgen_helm.batcher import Batcher, BatchSettings, _Pending, choose_batch


def _settings(**changes) -> BatchSettings:
    values = dict(
        max_new_tokens=4, temperature=0.0, top_p=1.0, num_completions=1, stop=(), echo_prompt=False, top_k_logprobs=0
    )
    values.update(changes)
    return BatchSettings(**values)


def _pending(length: int, arrived_s: float) -> _Pending:
    return _Pending(list(range(length)), None, _settings(), arrived_s)


def test_choose_batch_takes_all_that_fit_sorted_by_length():
    items = [_pending(length, arrived) for arrived, length in enumerate([9, 3, 7])]
    assert [len(item.prompt) for item in choose_batch(items, 4)] == [3, 7, 9]


def test_choose_batch_keeps_the_oldest_and_similar_lengths():
    # Lengths 1..10 arrived in that order except that the length-8 one is the oldest.
    items = [_pending(length, arrived_s=float(length)) for length in range(1, 11)]
    items[7] = _pending(8, arrived_s=-1.0)
    chosen = choose_batch(items, 3)
    assert [len(item.prompt) for item in chosen] in ([6, 7, 8], [7, 8, 9], [8, 9, 10])
    assert any(item.arrived_s == -1.0 for item in chosen)


def test_choose_batch_keeps_a_shared_prefix_together():
    """Two run entries' requests wait at once: the oldest one's prefix group goes alone, whole, even
    with room left (a call mixing prefixes would share none); the other group goes next."""
    from flexgen_core.prefix import SHARED_PREFIX_MIN_TOKENS
    from flexgen_helm.batcher import PREFIX_KEY_TOKENS

    assert PREFIX_KEY_TOKENS == SHARED_PREFIX_MIN_TOKENS
    a, b = [1] * 20, [2] * 20
    items = [_Pending((a if i % 2 else b) + [i] * (i % 3 + 1), None, _settings(), float(i)) for i in range(10)]
    chosen = choose_batch(items, 8)
    assert len(chosen) == 5 and all(item.prompt[:20] == b for item in chosen)  # item 0 (group b) is oldest
    rest = [item for item in items if item not in chosen]
    assert choose_batch(rest, 8) == sorted(rest, key=lambda item: (len(item.prompt), item.arrived_s))
    # A lone request of its prefix, or prompts too short to share, change nothing.
    lone = [_Pending([3] * 20, None, _settings(), -1.0)] + items
    assert len(choose_batch(lone, 20)) == 11
    short = [_pending(length, float(length)) for length in (4, 9, 12)]
    assert len(choose_batch(short, 8)) == 3


class _Recorder:
    def __init__(self, delay_s: float = 0.0):
        self.calls: list[tuple[BatchSettings, list[list[int]], list]] = []
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def __call__(self, settings, prompts, seeds):
        with self._lock:
            self.calls.append((settings, [list(p) for p in prompts], list(seeds)))
        time.sleep(self.delay_s)
        return [(settings, tuple(prompt), seed) for prompt, seed in zip(prompts, seeds)]


def test_settings_never_share_a_call_and_results_go_to_their_callers():
    recorder = _Recorder(delay_s=0.05)
    batcher = Batcher(recorder, block_size=4, idle_wait_s=0.1)
    kinds = [_settings(), _settings(max_new_tokens=5), _settings(temperature=0.7), _settings(stop=((13, 10),))]
    jobs = [(kinds[index % 4], [index] * (1 + index % 3), index) for index in range(24)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        outcomes = list(pool.map(lambda job: batcher.submit(job[1], job[0], seed=job[2]), jobs))
    batcher.close()
    for (settings, prompt, seed), outcome in zip(jobs, outcomes):
        got_settings, got_prompt, got_seed = outcome.result
        assert (dataclasses.astuple(got_settings), got_prompt, got_seed) == (dataclasses.astuple(settings), tuple(prompt), seed)
        assert 1 <= outcome.batch_size <= 4
    for settings, prompts, _ in recorder.calls:
        assert len(prompts) <= 4
        assert prompts == sorted(prompts, key=len)
        # prompt [i, ...] is job i; compared field by field, not by the class's own equality
        assert all(dataclasses.astuple(kinds[prompt[0] % 4]) == dataclasses.astuple(settings) for prompt in prompts)
    assert sum(len(prompts) for _, prompts, _ in recorder.calls) == len(jobs)
    assert max(len(prompts) for _, prompts, _ in recorder.calls) == 4


def test_num_completions_count_against_the_block():
    recorder = _Recorder()
    batcher = Batcher(recorder, block_size=6, idle_wait_s=0.2)
    settings = _settings(temperature=1.0, num_completions=3)
    with ThreadPoolExecutor(max_workers=6) as pool:
        outcomes = list(pool.map(lambda index: batcher.submit([index], settings), range(6)))
    batcher.close()
    assert all(outcome.batch_size == 2 for outcome in outcomes)


def test_a_lone_request_goes_after_the_idle_wait():
    batcher = Batcher(_Recorder(), block_size=64, idle_wait_s=0.3, max_wait_s=5.0)
    started_s = time.perf_counter()
    outcome = batcher.submit([1, 2, 3], _settings())
    waited_s = time.perf_counter() - started_s
    batcher.close()
    assert outcome.batch_size == 1 and 0.3 <= waited_s < 2.0


def test_a_failing_batch_raises_in_every_caller():
    def failing(settings, prompts, seeds):
        raise RuntimeError("engine exploded")

    batcher = Batcher(failing, block_size=2, idle_wait_s=0.05)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(batcher.submit, [index], _settings()) for index in range(2)]
        for future in futures:
            with pytest.raises(RuntimeError, match="engine exploded"):
                future.result()
    batcher.close()
