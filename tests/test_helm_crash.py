"""A `helm-run` through FlexGenClient killed with SIGKILL mid-run, then run again, loses nothing and
recomputes nothing (acceptance 2 of the failure-handling issue).

Three runs of the same two run entries on the `tiny` random-weight OPT (offload policy: weights and
KV cache partly on disk), each with its own prod_env/ and so its own HELM request cache:
- clean: uninterrupted;
- crash, first attempt: killed with SIGKILL once the engine has computed a few batches;
- crash, second attempt: the same command again.

What the engine computed is read from the client's `request_log` (one line per request the engine
ran, keyed by a digest of HELM's cache key); what survived the kill is read from HELM's SQLite cache.
Checked: the second attempt finishes; it computes exactly the requests that were not in the cache
after the kill (none twice, none already answered); the crashed run's stats equal the clean run's.

Stats are compared within 1e-5: a request recomputed in a different batch pads to a different shape,
which moves float32 logprobs by ~1e-7; texts must be identical. Timing stats are left out (they
measure the machine, not the model).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helm.common.cache import get_all_from_sqlite
from helm_support import (
    FLEXGEN_DEPLOYMENT,
    TEST_MODEL,
    helm_bin,
    load_json,
    offline_env,
    request_states,
    run_dirs,
    run_helm,
    write_prod_env,
    write_twitter_aae,
)

from flexgen_core.testing import PRESETS, build_checkpoint
from flexgen_helm.client import request_digest

NUM_INSTANCES = 24
ENTRIES = ["twitter_aae:demographic=aa", "synthetic_reasoning:mode=pattern_match"]
TOTAL_REQUESTS = 2 * NUM_INSTANCES  # one request per instance in both scenarios
# Engine-computed requests before the kill: the first entry done, the second under way, so the rerun
# answers one run entry wholly from the cache and the other partly.
KILL_AFTER_COMPUTED = NUM_INSTANCES + 6
STAT_TOLERANCE = 1e-5
# Wall-clock stats (and the batch shapes they depend on) differ between any two runs.
TIMING_STATS = {"inference_runtime", "inference_denoised_runtime", "batch_size", "training_co2_cost",
                "training_energy_cost"}


def _helm_run_command(prod_env: Path, output_path: Path, suite: str) -> list[str]:
    descriptions = [f"{entry},model={TEST_MODEL},model_deployment={FLEXGEN_DEPLOYMENT}" for entry in ENTRIES]
    return [
        helm_bin("helm-run"), "--run-entries", *descriptions, "--suite", suite,
        "--local-path", str(prod_env), "--output-path", str(output_path),
        "--max-eval-instances", str(NUM_INSTANCES), "-n", "4", "--exit-on-error",
    ]


def _log_digests(path: Path) -> list[str]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["request"] for line in handle if line.endswith("\n")]


def _cached_digests(prod_env: Path) -> set[str]:
    """Digests of the requests in HELM's SQLite cache for our deployment's organisation."""
    cache_file = prod_env / "cache" / f"{FLEXGEN_DEPLOYMENT.split('/')[0]}.sqlite"
    if not cache_file.exists():
        return set()
    return {request_digest(key) for key, _ in get_all_from_sqlite(str(cache_file))}


def _stats(run_dir: Path) -> dict[tuple, float]:
    """Mean of every non-timing stat, keyed by (name, split, perturbation)."""
    means = {}
    for stat in load_json(run_dir / "stats.json"):
        name = stat["name"]
        if name["name"] in TIMING_STATS or not stat.get("count"):
            continue
        key = (name["name"], name.get("split"), json.dumps(name.get("perturbation"), sort_keys=True))
        means[key] = stat["mean"]
    return means


def assert_same_stats(expected_runs: dict[str, Path], got_runs: dict[str, Path], entries: int) -> None:
    """Two suites' runs (run_dirs) hold the same run entries with the same non-timing stats."""
    assert set(expected_runs) == set(got_runs) and len(expected_runs) == entries
    for entry in expected_runs:
        expected, got = _stats(expected_runs[entry]), _stats(got_runs[entry])
        assert set(expected) == set(got) and len(expected) > 5
        for key, mean in expected.items():
            assert got[key] == pytest.approx(mean, abs=STAT_TOLERANCE), (entry, key)


@pytest.fixture(scope="module")
def crash_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("helm_crash")
    checkpoint = build_checkpoint("tiny", seed=0)
    output_path = root / "benchmark_output"
    write_twitter_aae(output_path, "aa", count=NUM_INSTANCES, seed=3)
    max_positions = PRESETS["tiny"].max_positions
    envs = {}
    for name in ("clean", "crash"):
        folder = root / name
        envs[name] = write_prod_env(
            folder / "prod_env", checkpoint, max_positions, flexgen_args={"request_log": str(folder / "requests.jsonl")}
        )

    run_helm(ENTRIES, FLEXGEN_DEPLOYMENT, envs["clean"], output_path, "clean", NUM_INSTANCES)

    crash_log = root / "crash" / "requests.jsonl"
    process = subprocess.Popen(
        _helm_run_command(envs["crash"], output_path, "crash"), env=offline_env(), cwd=str(root),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline_s = time.monotonic() + 600
    while len(_log_digests(crash_log)) < KILL_AFTER_COMPUTED and process.poll() is None:
        assert time.monotonic() < deadline_s, "the first attempt computed nothing in 10 minutes"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    returncode = process.wait()
    assert returncode == -signal.SIGKILL, f"helm-run ended on its own (exit {returncode}) before the kill"
    computed_before_kill = _log_digests(crash_log)
    cached_after_kill = _cached_digests(envs["crash"])
    stale_dirs = sorted(path.name for path in (envs["crash"] / "offload").iterdir())

    run_helm(ENTRIES, FLEXGEN_DEPLOYMENT, envs["crash"], output_path, "crash", NUM_INSTANCES)
    return dict(
        clean=run_dirs(output_path, "clean"),
        crash=run_dirs(output_path, "crash"),
        clean_computed=_log_digests(root / "clean" / "requests.jsonl"),
        computed_before_kill=computed_before_kill,
        computed_on_rerun=_log_digests(crash_log)[len(computed_before_kill):],
        cached_after_kill=cached_after_kill,
        stale_dirs=stale_dirs,
        offload_after_rerun=sorted(path.name for path in (envs["crash"] / "offload").iterdir()),
    )


def test_clean_run_computes_each_request_once(crash_runs):
    computed = crash_runs["clean_computed"]
    assert len(computed) == len(set(computed)) == TOTAL_REQUESTS


def test_kill_landed_mid_run(crash_runs):
    cached = crash_runs["cached_after_kill"]
    assert KILL_AFTER_COMPUTED <= len(crash_runs["computed_before_kill"]) < TOTAL_REQUESTS
    # Finished batches reached the cache before the kill, not only at the end of the run.
    assert 0 < len(cached) < TOTAL_REQUESTS
    assert cached <= set(crash_runs["computed_before_kill"])


def test_rerun_recomputes_nothing_already_answered(crash_runs):
    cached = crash_runs["cached_after_kill"]
    rerun = crash_runs["computed_on_rerun"]
    assert len(rerun) == len(set(rerun)), "a request was computed twice in the rerun"
    assert not cached & set(rerun), f"{len(cached & set(rerun))} answered requests were recomputed"
    # ...and it computed all the others: together they are exactly the clean run's requests.
    assert cached | set(rerun) == set(crash_runs["clean_computed"])
    assert len(rerun) == TOTAL_REQUESTS - len(cached)


def test_killed_run_left_an_offload_dir_that_the_rerun_removed(crash_runs):
    assert crash_runs["stale_dirs"], "the killed engine left no offload folder (nothing to check)"
    assert not set(crash_runs["stale_dirs"]) & set(crash_runs["offload_after_rerun"])


@pytest.mark.parametrize("entry", ENTRIES)
def test_results_and_stats_equal_clean_run(crash_runs, entry):
    key = entry  # run_dirs keys drop only the model parts
    clean_dir, crash_dir = crash_runs["clean"][key], crash_runs["crash"][key]
    clean_states, crash_states = request_states(clean_dir), request_states(crash_dir)
    assert len(clean_states) == len(crash_states) == NUM_INSTANCES
    for clean_state, crash_state in zip(clean_states, crash_states):
        assert clean_state["request"]["prompt"] == crash_state["request"]["prompt"]
        assert crash_state["result"]["success"], crash_state["result"].get("error")
        clean_texts = [c["text"] for c in clean_state["result"]["completions"]]
        assert clean_texts == [c["text"] for c in crash_state["result"]["completions"]]

    clean_stats, crash_stats = _stats(clean_dir), _stats(crash_dir)
    assert clean_stats.keys() == crash_stats.keys()
    assert len(clean_stats) > 5
    differing = {
        name: (clean_stats[name], crash_stats[name])
        for name in clean_stats
        if not math.isclose(clean_stats[name], crash_stats[name], rel_tol=STAT_TOLERANCE, abs_tol=STAT_TOLERANCE)
    }
    assert not differing, differing
