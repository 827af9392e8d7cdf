"""HELM's SlurmRunner over FlexGen deployments (`flexgen_helm.slurm_runner.SlurmRunner`), against a real
Slurm: the random demo conf's two run entries as two jobs running at once on one node give the same
stats as a plain `helm-run`; their offload folders are gone afterwards.

Needs a local Slurm (skipped otherwise, saying how to get one):
    apt-get install -y slurm-wlm munge && bash scripts/slurm_local.sh
and HELM's slurm extra (`pip install -e .[slurm]`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from helm_support import helm_bin, offline_env, run_dirs
from test_helm_crash import assert_same_stats

from flexgen_helm import demo

INSTANCES = 4
HOW = "apt-get install -y slurm-wlm munge && bash scripts/slurm_local.sh (as root), and pip install -e .[slurm]"


def _slurm_ready() -> str | None:
    try:
        import simple_slurm  # noqa: F401
    except ImportError:
        return "HELM's slurm extra (simple_slurm) is not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "no Slurm here (sinfo not found or not answering)"
    if out.returncode != 0 or not re.search(r"idle|mix", out.stdout):
        return f"no idle Slurm node ({out.stdout.strip() or out.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    why = _slurm_ready()
    if why:
        pytest.skip(f"{why}: {HOW}")
    home = tmp_path_factory.mktemp("home")
    built = subprocess.run([sys.executable, "-c", "from flexgen_helm.demo import ensure_demo_model; "
                            "ensure_demo_model(print)"], env=offline_env(home), capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    prod_env = home / "prod_env"
    prod_env.mkdir()
    (prod_env / "runner_config.yaml").write_text(yaml.safe_dump({
        "slurm_monitor_interval": 2,
        "slurm_args": {"partition": "debug", "cpus_per_task": "1", "mem": "4G", "time": "01:00:00",
                       "open_mode": "append"},
    }))
    output_path = home / "benchmark_output"
    common = ["--conf-paths", str(demo.RANDOM_DEMO_CONF), "--output-path", str(output_path),
              "--max-eval-instances", str(INSTANCES), "-n", "4", "--local-path", str(prod_env)]
    plain = subprocess.run([helm_bin("helm-run"), *common, "--suite", "plain"], env=offline_env(home),
                           capture_output=True, text=True, timeout=900, cwd=home)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    env = offline_env(home) | {"HELM_MAX_CONCURRENT_WORKER_SLURM_JOBS": "2"}
    started = datetime.now()
    slurm = subprocess.run([helm_bin("helm-run"), *common, "--suite", "slurm", "--runner-class-name",
                            "flexgen_helm.slurm_runner.SlurmRunner"], env=env, capture_output=True, text=True,
                           timeout=1200, cwd=home)
    return {"home": home, "output_path": output_path, "slurm": slurm, "started": started}


def _log_span(log: Path) -> tuple[datetime, datetime]:
    stamps = [datetime.strptime(m, "%Y-%m-%d %H:%M:%S") for m in
              re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ", log.read_text(), re.M)]
    return min(stamps), max(stamps)


def test_slurm_jobs_give_the_plain_runs_stats(runs):
    slurm = runs["slurm"]
    assert slurm.returncode == 0, slurm.stdout[-3000:] + slurm.stderr[-3000:]
    assert_same_stats(run_dirs(runs["output_path"], "plain"), run_dirs(runs["output_path"], "slurm"), 2)


def test_the_two_jobs_ran_at_once_and_left_no_offload_files(runs):
    (base,) = sorted((runs["home"] / "slurm").iterdir())[-1:]
    states = json.loads((base / "worker_slurm_jobs.json").read_text())
    assert len(states) == 2 and all(job["state"] == "COMPLETED" for job in states.values()), states
    spans = [_log_span(log) for log in sorted((base / "logs").glob("*.log"))]
    assert len(spans) == 2
    (a_start, a_end), (b_start, b_end) = spans
    assert a_start <= b_end and b_start <= a_end, spans  # the intervals overlap: both ran at once
    offload = runs["home"] / ".cache" / "flexgen-helm" / "offload"
    assert not offload.exists() or not [p for p in offload.iterdir() if "engine-" in p.name]
