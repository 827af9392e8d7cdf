"""HELM's own runners over FlexGen deployments: `flexgen_helm.runner.MultiGPURunner` (HELM's
MultiGPURunner with the plugins loaded in each worker) runs the packaged random-model demo conf with
two workers on the CPU and gives the same stats as a plain `helm-run`; HELM's own MultiGPURunner
fails those runs (the reason this runner exists)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helm_support import helm_bin, offline_env, run_dirs
from test_helm_crash import assert_same_stats

from flexgen_helm import demo

INSTANCES = 4


def _helm_run(home: Path, output_path: Path, suite: str, runner: str | None = None, workers: int = 2):
    env = offline_env(home)
    command = [helm_bin("helm-run"), "--conf-paths", str(demo.RANDOM_DEMO_CONF), "--suite", suite,
               "--output-path", str(output_path), "--max-eval-instances", str(INSTANCES), "-n", "4"]
    if runner is not None:
        command += ["--runner-class-name", runner]
        env["HELM_MAX_CONCURRENT_WORKERS"] = str(workers)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=home)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    built = subprocess.run([sys.executable, "-c", "from flexgen_helm.demo import ensure_demo_model; "
                            "ensure_demo_model(print)"], env=offline_env(home), capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    output_path = home / "benchmark_output"
    plain = _helm_run(home, output_path, "plain")
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    multi = _helm_run(home, output_path, "multi", "flexgen_helm.runner.MultiGPURunner")
    return {"home": home, "output_path": output_path, "multi": multi}


def test_multi_gpu_runner_gives_the_plain_runs_stats(runs):
    multi = runs["multi"]
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    assert_same_stats(run_dirs(runs["output_path"], "plain"), run_dirs(runs["output_path"], "multi"), 2)


def test_helms_own_multi_gpu_runner_cannot_find_the_deployments(runs):
    """Why the subclass exists: without the plugins in its workers HELM's runner fails every run."""
    own = _helm_run(runs["home"], runs["output_path"], "helm-own", "helm.benchmark.multi_gpu_runner.MultiGPURunner")
    assert own.returncode != 0 and "Failed runs" in own.stdout + own.stderr
