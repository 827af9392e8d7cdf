"""`helm-run -n 64` through FlexGenClient gathers HELM's single requests into large engine batches
(acceptance 3 of the HELM plugin issue): HELM's own efficiency stats show a mean batch size > 16.

Plain `helm-run` (subprocess, offline) on the `tiny` random-weight OPT, blocks of 32 x 2 sequences,
two run entries: language-model scoring (echo, max_tokens=0) and generation with a stop sequence.
"""

from __future__ import annotations

import pytest
from helm_support import (
    FLEXGEN_DEPLOYMENT,
    request_states,
    run_dirs,
    run_helm,
    stat_mean,
    write_prod_env,
    write_twitter_aae,
)

from flexgen_core.testing import PRESETS, build_checkpoint

NUM_INSTANCES = 96
ENTRIES = ["twitter_aae:demographic=white", "synthetic_reasoning:mode=variable_substitution"]
POLICY = dict(
    gpu_batch_size=32,
    num_gpu_batches=2,
    w_gpu_percent=100,
    w_cpu_percent=0,
    cache_gpu_percent=100,
    cache_cpu_percent=0,
    act_gpu_percent=100,
    act_cpu_percent=0,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("helm_batching")
    checkpoint = build_checkpoint("tiny", seed=0)
    output_path = root / "benchmark_output"
    write_twitter_aae(output_path, "white", count=NUM_INSTANCES, seed=1)
    prod_env = write_prod_env(
        root / "prod_env", checkpoint, PRESETS["tiny"].max_positions, flexgen_args={"policy": POLICY}
    )
    run_helm(ENTRIES, FLEXGEN_DEPLOYMENT, prod_env, output_path, "n64", NUM_INSTANCES, num_threads=64)
    return run_dirs(output_path, "n64")


@pytest.mark.parametrize("entry", ENTRIES)
def test_mean_batch_size_above_16(runs, entry):
    states = request_states(runs[entry])
    assert len(states) >= NUM_INSTANCES
    assert all(state["result"]["success"] for state in states)
    sizes = [state["result"]["batch_size"] for state in states]
    assert max(sizes) <= POLICY["gpu_batch_size"] * POLICY["num_gpu_batches"]
    mean_batch_size = stat_mean(runs[entry], "batch_size")
    assert mean_batch_size is not None, "HELM's stats have no batch_size"
    assert mean_batch_size > 16, f"mean batch size {mean_batch_size:.1f} (sizes {sorted(sizes)})"
