"""`flexgen-helm plan`: the predicted wall time of a whole HELM conf through FlexGen, before running it.

For each run entry of the conf(s): the requests HELM would send, from `helm-run --dry-run` (in a
scratch folder; it adapts the scenario's instances into prompts with the deployment's tokenizer and
computes nothing): instances, prompt lengths, the prefix every prompt shares, `max_tokens`,
`num_completions`. Where an entry's data or tokenizer cannot be had here (offline), the lengths stated
for the FlexGen paper's sub-scenarios are used instead, and the table says which. Then the cost model
and planner (flexgen_core.plan) choose a policy per entry on a hardware profile and predict the
entry's time: the shared prefix's pass once, then ceil(sequences / block) blocks.

Predictions cost each block at the mean prompt length and every sequence decoding its full
`max_tokens` (early stops not modelled); HELM's own time (start-up, adaptation, metrics) is not counted.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from flexgen_core.prefix import common_prefix_len
from flexgen_helm.compare import split_run_name

MEASURED = "measured: helm-workload.md (helm-run --dry-run, HELM 0.5.16)"
PAPER = "paper: flexgen-paper.md, HELM table"
_WIKIFACT_OUTPUTS = ("HELM get_wikifact_spec: num_outputs=k=5 at temperature 1.0; the engine samples each "
                     "completion as a sequence of its own")
_GREEDY_ONE = "HELM run spec: one output"
_MMLU_OUTPUTS = ("HELM get_multiple_choice_adapter_spec: num_outputs=5 at temperature 0; the engine computes one "
                 "greedy completion and copies it")
_CANONICAL = ("stated, an upper bound: data_augmentation=canonical adds 4 perturbed copies of each instance "
              "(mild_mix, dialect, gender, person_name; HELM run_expander), dropping those it leaves unchanged")
_MMLU_LENGTHS = ("measured for mmlu college_mathematics (5-shot, multiple_choice_joint); stated for this subject, "
                 "whose prompts are built the same way (the paper's padding figure implies ~384 real of 512)")


@dataclass(frozen=True)
class EntryWorkload:
    """What one run entry asks of the engine, and where each figure came from (`*_source`)."""

    instances: int
    instances_source: str
    versions: int                  # requests per instance (data augmentation)
    versions_source: str
    sequences_per_request: int     # sequences the engine computes per request
    sequences_source: str
    prompt_len: int
    prompt_source: str
    prefix_len: int
    prefix_source: str
    gen_len: int
    gen_source: str

    @property
    def sequences(self) -> int:
        return self.instances * self.versions * self.sequences_per_request


# The FlexGen paper's 7 HELM sub-scenarios (run_specs/flexgen.conf), as stated where no dry run can be had.
STATED = {
    "wikifact:k=5,subject=plaintiff": EntryWorkload(
        96, PAPER, 1, "no data augmentation", 5, _WIKIFACT_OUTPUTS,
        79, MEASURED, 72, MEASURED, 8, "HELM run spec: max_tokens=8 (stop at a newline)"),
    "wikifact:k=5,subject=instance_of": EntryWorkload(
        850, PAPER, 1, "no data augmentation", 5, _WIKIFACT_OUTPUTS,
        79, "stated: wikifact plaintiff's measurement (same adapter, 5 in-context facts)",
        72, "stated: wikifact plaintiff's measurement", 8, "HELM run spec: max_tokens=8 (stop at a newline)"),
    "mmlu:subject=abstract_algebra,data_augmentation=canonical": EntryWorkload(
        100, PAPER, 5, _CANONICAL, 1, _MMLU_OUTPUTS, 297, _MMLU_LENGTHS, 261, _MMLU_LENGTHS, 1,
        "HELM run spec: max_tokens=1"),
    "mmlu:subject=us_foreign_policy,data_augmentation=canonical": EntryWorkload(
        100, PAPER, 5, _CANONICAL, 1, _MMLU_OUTPUTS, 297, _MMLU_LENGTHS, 261, _MMLU_LENGTHS, 1,
        "HELM run spec: max_tokens=1"),
    "synthetic_reasoning:mode=pattern_match": EntryWorkload(
        515, PAPER, 1, "no data augmentation", 1, _GREEDY_ONE, 230, MEASURED, 197, MEASURED,
        50, "HELM run spec: max_tokens=50; costed in full (measured mean completion 18.7 with stop \\n, but a "
            "block decodes until its longest)"),
    "synthetic_reasoning_natural:difficulty=easy": EntryWorkload(
        515, PAPER, 1, "no data augmentation", 1, _GREEDY_ONE, 390, MEASURED, 302, MEASURED,
        20, "HELM run spec: max_tokens=20"),
    "summarization_xsum_sampled:temperature=0.3,device=cpu": EntryWorkload(
        518, PAPER, 1, "no data augmentation", 1, "HELM run spec: one output at temperature 0.3",
        1550, "stated, not measured: the paper's padded input of 1,984 at its 78.7% padding efficiency "
              "(0.787 x (1,984 + 64) - 64)",
        850, "stated, not measured: the 5 in-context examples (HELM keeps train articles of 50-150 words, "
             "each with a one-sentence summary: ~170 tokens each), which always fit beside an article "
             "truncated to 512 words",
        64, "paper (1,984 in, 64 out); HELM run spec: max_tokens=64"),
}


def entry_key(description: str) -> str:
    """A run entry without its model arguments (`model=`, `model_deployment=`)."""
    return split_run_name(description)[0]


def _run_dir_for(description: str, run_dirs: Sequence[Path]) -> Path | None:
    """The dry run's folder of a run entry: HELM's run name holds every argument of the description
    (it may add some, e.g. `method=`)."""
    wanted = set(entry_key(description).replace("/", "_").split(","))
    for run_dir in run_dirs:
        if wanted <= set(run_dir.name.split(",")):
            return run_dir
    return None


def workload_from_dry_run(run_dir: Path, tokenizer) -> EntryWorkload:
    """The requests of a `helm-run --dry-run` folder, tokenised as the engine will see them. Counted per
    request (data augmentation and multiple-choice-separate requests included)."""
    states = json.loads((run_dir / "scenario_state.json").read_text(encoding="utf-8"))["request_states"]
    if not states:
        raise ValueError(f"{run_dir.name}: the dry run made no requests")
    prompts = [tokenizer(s["request"]["prompt"])["input_ids"] for s in states]
    per_request = [s["request"]["num_completions"] if s["request"]["temperature"] > 0 else 1 for s in states]
    instances = len({s["instance"]["id"] for s in states})
    lengths = [len(p) for p in prompts]
    prefix = common_prefix_len(prompts)  # the engine's own rule: each prompt keeps a token of its own
    return EntryWorkload(
        len(states), f"dry run: {len(states)} requests for {instances} instances", 1, "counted per request",
        round(sum(per_request) / len(states)), "dry run: num_completions at temperature > 0, else 1",
        round(sum(lengths) / len(lengths)), f"dry run: mean of {len(lengths)} prompts (max {max(lengths)})",
        prefix, "dry run: the longest prefix every prompt shares",
        max(s["request"]["max_tokens"] for s in states), "dry run: the largest max_tokens")


# Where HELM's scenarios and tokenizers come from: reaching none of them means the dry run can measure
# only what is already on this machine.
DATA_HOSTS = ("huggingface.co", "storage.googleapis.com", "people.eecs.berkeley.edu")


def online(hosts: Sequence[str] = DATA_HOSTS, timeout_s: float = 3.0) -> bool:
    """Whether any of `hosts` accepts a connection on port 443 within `timeout_s` (all tried at once)."""
    import concurrent.futures
    import socket

    def reach(host: str) -> bool:
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            return True
        except OSError:
            return False

    pool = concurrent.futures.ThreadPoolExecutor(len(hosts))
    futures = [pool.submit(reach, host) for host in hosts]
    done, _ = concurrent.futures.wait(futures, timeout=timeout_s + 0.5)
    pool.shutdown(wait=False)  # a lookup that hangs past the timeout is abandoned, not waited for
    return any(f.result() for f in done)


def dry_run(conf_paths: Sequence[str], max_eval_instances: int | None, local_path: str | None,
            folder: Path, offline: bool = False) -> tuple[list[Path], str]:
    """`helm-run --dry-run` of the confs into `folder`; the run folders it wrote, and its output."""
    command = [sys.executable, "-m", "helm.benchmark.run", "--conf-paths", *conf_paths, "--suite", "plan",
               "--output-path", str(folder), "--dry-run", "-n", "8"]
    if max_eval_instances is not None:
        command += ["--max-eval-instances", str(max_eval_instances)]
    if local_path is not None:
        command += ["--local-path", local_path]
    env = dict(os.environ)
    if offline:  # the hub's libraries fail at once instead of retrying
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    completed = subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env)
    runs = sorted(p.parent for p in (folder / "runs" / "plan").glob("*/scenario_state.json"))
    return runs, completed.stdout + completed.stderr


@dataclass(frozen=True)
class EntryPlan:
    description: str
    workload: EntryWorkload | None
    why_stated: str | None       # why the dry run could not serve this entry (None: it did)
    estimate: object | None      # flexgen_core.plan.cost_model.Estimate
    seconds: float | None

    @property
    def blocks(self) -> int | None:
        if self.estimate is None or self.workload is None:
            return None
        return math.ceil(self.workload.sequences / self.estimate.policy.block_size)


def plan_suite(descriptions: Sequence[str], workloads: dict[str, tuple[EntryWorkload | None, str | None]],
               model, hardware, dtype_bytes: int) -> list[EntryPlan]:
    from flexgen_core.plan.workload import Workload
    from flexgen_core.plan.search import PlanOptions, plan

    plans = []
    for description in descriptions:
        workload, why = workloads[description]
        if workload is None:
            plans.append(EntryPlan(description, None, why, None, None))
            continue
        shape = Workload(workload.prompt_len, workload.gen_len, workload.prefix_len)
        result = plan(model, shape, hardware, dtype_bytes, PlanOptions(max_block_size=workload.sequences))
        plans.append(EntryPlan(description, workload, why, result.best, result.best.run_seconds(workload.sequences)))
    return plans


def format_plans(plans: Sequence[EntryPlan], model_name: str, hardware_name: str) -> str:
    header = ("run entry", "lengths", "sequences", "prompt / shared / gen", "policy", "blocks", "predicted")
    rows, reasons = [], []
    for p in plans:
        key = entry_key(p.description)
        mark = ""
        if p.why_stated is not None:
            reasons.append(f"  [{len(reasons) + 1}] {key}: {p.why_stated}")
            mark = f" [{len(reasons)}]"
        if p.workload is None:
            rows.append((key, "none" + mark, "", "", "", "", "n/a"))
            continue
        w, policy = p.workload, p.estimate.policy
        rows.append((key, ("dry run" if p.why_stated is None else "stated") + mark, str(w.sequences),
                     f"{w.prompt_len} / {w.prefix_len} / {w.gen_len}",
                     f"{policy.gpu_batch_size}x{policy.num_gpu_batches}, {' '.join(map(str, policy.percent))}"
                     + (", CPU attention" if policy.cpu_cache_compute else ""),
                     str(p.blocks), f"{p.seconds / 60:.1f} min"))
    total = sum(p.seconds for p in plans if p.seconds is not None)
    rows.append(("total", "", str(sum(p.workload.sequences for p in plans if p.workload)), "", "", "",
                 f"{total / 60:.0f} min ({total / 3600:.1f} h)"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"Predicted time through FlexGen: {model_name} on {hardware_name} (cost model + planner; HELM's own "
             "start-up, adaptation and metrics not counted)", ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(3, "  ".join("-" * w for w in widths))
    if reasons:
        lines += ["", "Lengths stated, not measured (the FlexGen paper's sub-scenarios; flexgen_helm/suite_plan.py "
                      "says where each figure comes from), where the dry run could not serve an entry:", *reasons]
    return "\n".join(lines)


def collect(descriptions: Sequence[str], conf_paths: Sequence[str], max_eval_instances: int | None,
            local_path: str | None, tokenizer_for,
            offline: bool = False) -> dict[str, tuple[EntryWorkload | None, str | None]]:
    """Each entry's workload: from the dry run where it produced the entry's requests, else stated.
    `tokenizer_for(description)` gives the tokenizer the engine would use (or raises)."""
    with tempfile.TemporaryDirectory(prefix="flexgen-helm-plan.") as tmp:
        runs, output = dry_run(conf_paths, max_eval_instances, local_path, Path(tmp), offline)
        workloads = {}
        for description in descriptions:
            run_dir = _run_dir_for(description, runs)
            why = None
            if run_dir is not None:
                try:
                    workloads[description] = (workload_from_dry_run(run_dir, tokenizer_for(description)), None)
                    continue
                except Exception as error:  # no tokenizer here, an empty run: fall back, saying why
                    why = str(error).splitlines()[0]
            else:
                why = _dry_run_failure(output, description)
            stated = STATED.get(entry_key(description))
            workloads[description] = (stated, why if stated else f"{why}; no stated lengths for it")
    return workloads


def _dry_run_failure(output: str, description: str) -> str:
    """The dry run's reason for leaving an entry out: the exception HELM logged for its run, whole. HELM
    logs "Error when running <run>:" and a traceback; this plugin's own errors come as one line,
    "Error when running <run>: <message>" (helm_errors.py)."""
    wanted = set(entry_key(description).replace("/", "_").split(","))
    for block in output.split("Error when running ")[1:]:
        first, _, rest = block.partition("\n")
        run_name, _, message = first.partition(": ")
        run_name = run_name.strip().removesuffix(":")
        if not wanted <= set(run_name.split(",")):
            continue
        if message.strip():
            return message.strip()
        traceback_lines = []
        for line in rest.splitlines():
            if re.match(r"\d{4}-\d\d-\d\d ", line):  # HELM's next log line: the traceback is over
                break
            traceback_lines.append(line)
        errors = [line.strip() for line in traceback_lines
                  if line and not line.startswith(" ") and "Error" in line.split(":", 1)[0]]
        if errors:
            return errors[-1]
    return "it made no requests (its data cannot be had here?)"
