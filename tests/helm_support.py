"""Helpers for the HELM tests: offline scenario data in HELM's layout, a prod_env/ folder with
local deployments, and running `helm-run` as a subprocess (plain HELM, our package installed).

Scenario data written here is synthetic (made-up questions and tweets from a fixed word list): the
tests compare two clients on the same prompts, they do not measure a model.
"""

from __future__ import annotations

import csv
import datetime
import glob
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

WORDS = (
    "the of and a to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part river stone bird garden light music paper window yellow"
).split()

TEST_MODEL = "local/tiny"
HF_DEPLOYMENT = "local-hf/tiny"
FLEXGEN_DEPLOYMENT = "local-flexgen/tiny"

# Weights 30% on the compute device, 30% in RAM, 40% on disk; KV cache half in RAM, half on disk.
OFFLOAD_POLICY = dict(
    gpu_batch_size=2,
    num_gpu_batches=2,
    w_gpu_percent=30,
    w_cpu_percent=30,
    cache_gpu_percent=0,
    cache_cpu_percent=50,
    act_gpu_percent=100,
    act_cpu_percent=0,
    overlap=True,
)


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_mmlu(output_path: Path, subject: str, num_dev: int = 5, num_test: int = 8, seed: int = 0) -> None:
    """`<output>/scenarios/mmlu/data/{dev,val,test}/<subject>_<split>.csv`: question, 4 options, letter."""
    rng = random.Random(seed)
    for split, count in (("dev", num_dev), ("val", 2), ("test", num_test)):
        folder = output_path / "scenarios" / "mmlu" / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            for _ in range(count):
                question = _sentence(rng, 5, 12).capitalize() + "?"
                options = [_sentence(rng, 1, 3) for _ in range(4)]
                writer.writerow([question, *options, rng.choice("ABCD")])


WIKIFACT_PIDS = {"plaintiff": "P1620", "instance_of": "P31"}  # HELM's wikifact_scenario.py table


def write_wikifact(output_path: Path, subject: str = "plaintiff", num_train: int = 8, num_test: int = 34,
                   seed: int = 0) -> None:
    """`<output>/scenarios/wikifact/data/{train,dev,test}.jsonl`: one fact per line, as HELM downloads
    them (`property`, a `template` ending where the object should follow, `result_names`)."""
    rng = random.Random(seed)
    folder = output_path / "scenarios" / "wikifact" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("dev", 2), ("test", num_test)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for _ in range(count):
                case = f"{_sentence(rng, 1, 3).title()} v. {_sentence(rng, 1, 2).title()}"
                answer = _sentence(rng, 1, 3).title()
                fact = {"property": WIKIFACT_PIDS[subject], "template": f"The {subject} in {case} is",
                        "result_names": [[answer]]}
                handle.write(json.dumps(fact) + "\n")


def write_twitter_aae(output_path: Path, demographic: str = "aa", count: int = 8, seed: int = 0) -> None:
    """`<output>/scenarios/twitter_aae/<demographic>_tweets.csv`: one tweet per row."""
    rng = random.Random(seed)
    folder = output_path / "scenarios" / "twitter_aae"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{demographic}_tweets.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        for _ in range(count):
            writer.writerow([_sentence(rng, 4, 20)])


def write_prod_env(
    folder: Path,
    checkpoint: Path,
    max_positions: int,
    flexgen_args: Mapping[str, Any] | None = None,
    extra_deployments: Sequence[Mapping[str, Any]] = (),
    prefix_token: str = "</s>",
    end_of_text_token: str = "</s>",
    hf_args: Mapping[str, Any] | None = None,
) -> Path:
    """A prod_env/ with `local/tiny` served by HELM's HuggingFaceClient and by FlexGenClient."""
    folder.mkdir(parents=True, exist_ok=True)
    # HELM's window service counts prompt tokens without the `</s>` OPT's tokenizer prepends.
    max_sequence_length = max_positions - 1
    metadata = {
        "models": [
            {
                "name": TEST_MODEL,
                "display_name": "Local test model",
                "description": "Random-weight OPT built by flexgen_core.testing",
                "creator_organization_name": "tests",
                "access": "open",
                "release_date": datetime.date(2024, 1, 1),
                "tags": ["TEXT_MODEL_TAG"],
            }
        ]
    }
    tokenizers = {
        "tokenizer_configs": [
            {
                "name": TEST_MODEL,
                "tokenizer_spec": {
                    "class_name": "helm.tokenizers.huggingface_tokenizer.HuggingFaceTokenizer",
                    "args": {"pretrained_model_name_or_path": str(checkpoint)},
                },
                "end_of_text_token": end_of_text_token,
                "prefix_token": prefix_token,  # OPT prepends </s>; Llama-style tokenizers <s>
            }
        ]
    }
    args = {
        "pretrained_model_name_or_path": str(checkpoint),
        "policy": dict(OFFLOAD_POLICY),
        "offload_dir": str(folder / "offload"),
        "device": "cpu",
        "dtype": "float32",
    }
    args.update(flexgen_args or {})
    deployments = {
        "model_deployments": [
            {
                "name": HF_DEPLOYMENT,
                "model_name": TEST_MODEL,
                "tokenizer_name": TEST_MODEL,
                "max_sequence_length": max_sequence_length,
                "client_spec": {
                    "class_name": "helm.clients.huggingface_client.HuggingFaceClient",
                    "args": {"pretrained_model_name_or_path": str(checkpoint), "device": "cpu", **(hf_args or {})},
                },
            },
            {
                "name": FLEXGEN_DEPLOYMENT,
                "model_name": TEST_MODEL,
                "tokenizer_name": TEST_MODEL,
                "max_sequence_length": max_sequence_length,
                "client_spec": {"class_name": "flexgen_helm.client.FlexGenClient", "args": args},
            },
            *extra_deployments,
        ]
    }
    for name, content in (
        ("model_metadata.yaml", metadata),
        ("tokenizer_configs.yaml", tokenizers),
        ("model_deployments.yaml", deployments),
    ):
        with open(folder / name, "w", encoding="utf-8") as handle:
            yaml.safe_dump(content, handle, sort_keys=False)
    return folder


def offline_env(home: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if home is not None:
        env["HOME"] = str(home)
    return env


def helm_bin(name: str) -> str:
    """A console script installed next to this Python."""
    return str(Path(sys.executable).parent / name)


def run_helm(
    entries: Sequence[str],
    deployment: str,
    local_path: Path,
    output_path: Path,
    suite: str,
    max_eval_instances: int,
    num_threads: int = 4,
    extra_args: Sequence[str] = (),
    timeout_s: float = 600,
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`helm-run` on `entries` (run-entry descriptions without the model) for one deployment;
    `extra_env`: variables set for it on top of the offline ones (e.g. FLEXGEN_HARDWARE for policy auto)."""
    descriptions = [f"{entry},model={TEST_MODEL},model_deployment={deployment}" for entry in entries]
    command = [
        helm_bin("helm-run"),
        "--run-entries", *descriptions,
        "--suite", suite,
        "--local-path", str(local_path),
        "--output-path", str(output_path),
        "--max-eval-instances", str(max_eval_instances),
        "-n", str(num_threads),
        "--exit-on-error",
        *extra_args,
    ]
    completed = subprocess.run(
        command, env={**offline_env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout_s,
        cwd=str(local_path.parent),
    )
    if completed.returncode != 0:
        raise AssertionError(
            f"helm-run failed ({completed.returncode}):\n{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
        )
    return completed


def run_dirs(output_path: Path, suite: str) -> dict[str, Path]:
    """Run folders of a suite keyed by the run entry's scenario part (before the model args)."""
    found = {}
    for path in sorted(glob.glob(str(output_path / "runs" / suite / "*" / "scenario_state.json"))):
        run_dir = Path(path).parent
        name = run_dir.name
        key = ",".join(part for part in name.split(",") if not part.startswith(("model=", "model_deployment=")))
        found[key] = run_dir
    return found


def load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def request_states(run_dir: Path) -> list[dict]:
    return load_json(run_dir / "scenario_state.json")["request_states"]


def stat_mean(run_dir: Path, metric: str, split: str | None = None) -> float | None:
    """Mean of a metric in stats.json (no perturbation), the first split found if none is named."""
    for stat in load_json(run_dir / "stats.json"):
        name = stat["name"]
        if name["name"] != metric or name.get("perturbation"):
            continue
        if split is not None and name.get("split") != split:
            continue
        if stat.get("count", 0):
            return stat["mean"]
    return None
