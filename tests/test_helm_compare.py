"""`flexgen-helm compare`: two local suites (FlexGenClient and HELM's own HuggingFaceClient on the
same model: every metric equal within float noise) and a reference laid out as HELM's published
releases (another model's rows, mapped with --model-map, flagged as a different model)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess

import pytest
from helm_support import FLEXGEN_DEPLOYMENT, HF_DEPLOYMENT, TEST_MODEL, helm_bin, run_dirs, run_helm, write_mmlu, \
    write_prod_env

from flexgen_core.testing import PRESETS, build_checkpoint
from flexgen_helm import compare

ENTRIES = ["mmlu:subject=anatomy,method=multiple_choice_joint", "synthetic_reasoning:mode=pattern_match"]
NOISE = 1e-4  # logprob-derived metrics of two clients differ by float rounding only


@pytest.fixture(scope="module")
def suites(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    checkpoint = build_checkpoint("tiny", seed=0)
    prod_env = write_prod_env(root / "prod_env", checkpoint, PRESETS["tiny"].max_positions)
    output = root / "benchmark_output"
    write_mmlu(output, "anatomy", num_test=4)
    run_helm(ENTRIES, FLEXGEN_DEPLOYMENT, prod_env, output, "ours", 4)
    run_helm(ENTRIES, HF_DEPLOYMENT, prod_env, output, "hf", 4)
    return root, output


def _compare(*args: str):
    return subprocess.run([helm_bin("flexgen-helm"), "compare", *args], capture_output=True, text=True)


def test_two_local_suites_agree_within_float_noise(suites, tmp_path):
    _, output = suites
    out = _compare("--suite", "ours", "--output-path", str(output), "--against", str(output),
                   "--against-suite", "hf", "--all-metrics", "--csv", str(tmp_path / "t.csv"),
                   "--markdown", str(tmp_path / "t.md"), "--plot", str(tmp_path / "t.png"))
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "t.csv").read_text())))
    assert {r["run_entry"] for r in rows} == set(ENTRIES) and len(rows) > 20
    for row in rows:
        assert row["reference_model"] == row["model"] == TEST_MODEL.replace("/", "_"), row
        assert row["ours_count"] == row["reference_count"] != "0", row
        if not compare.client_reported(row["metric"]):  # those are marked in the table, see compare.py
            assert abs(float(row["difference"])) <= NOISE, row
    reported = [r for r in rows if compare.client_reported(r["metric"])]
    assert reported and out.stdout.count("reported by each client") == len(reported)
    assert "exact_match" in out.stdout and "different models" not in out.stdout
    assert (tmp_path / "t.md").read_text().startswith("| run entry | metric |") and (tmp_path / "t.png").stat().st_size


def _release_tree(output, root):
    """HELM's published layout: releases/<release>/runs_to_run_suites.json, runs/<suite>/<run>/stats.json,
    here with the HF client's runs renamed to another model, as HELM Classic's OPT-175B rows are."""
    tree = root / "published" / "benchmark_output"
    mapping = {}
    for entry, run_dir in run_dirs(output, "hf").items():
        name = f"{entry},model=together_opt-175b"
        shutil.copytree(run_dir, tree / "runs" / "v0.9.9" / name)
        mapping[name] = "v0.9.9"
    (tree / "releases" / "v9").mkdir(parents=True)
    (tree / "releases" / "v9" / "runs_to_run_suites.json").write_text(json.dumps(mapping))
    (tree / "releases" / "v9" / "summary.json").write_text(json.dumps({"release": "v9", "suites": ["v0.9.9"]}))
    return tree


def test_a_published_release_with_another_model(suites, tmp_path):
    root, output = suites
    tree = _release_tree(output, tmp_path)
    out = _compare("--suite", "ours", "--output-path", str(output), "--against", str(tree),
                   "--against-release", "v9", "--model-map", f"{TEST_MODEL}=together/opt-175b",
                   "--csv", str(tmp_path / "r.csv"))
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert [r["metric"] for r in rows] == ["exact_match", "quasi_exact_match"]  # each scenario's main metric
    assert all(r["reference_model"] == "together_opt-175b" and r["reference"] for r in rows)
    assert out.stdout.count("different models, the difference is the model's") == 2
    unmapped = _compare("--suite", "ours", "--output-path", str(output), "--against", str(tree),
                        "--against-release", "v9")
    assert unmapped.returncode == 0 and "2 row(s) without a reference run" in unmapped.stdout


@pytest.mark.parametrize("args, message", [
    (["--against", "/no/such/folder"], "is not a folder"),
    (["--against", "{out}", "--model-map", "nomapping"], "--model-map takes OURS=REF"),
    (["--against", "{out}", "--against-suite", "nope"], "no suite 'nope'"),
])
def test_bad_arguments_are_one_line(suites, args, message):
    _, output = suites
    out = _compare("--suite", "ours", "--output-path", str(output), *[a.replace("{out}", str(output)) for a in args])
    assert out.returncode == 1 and out.stderr.startswith("error: ") and message in out.stderr
    assert out.stderr.count("\n") == 1


def test_the_test_split_is_preferred_and_perturbed_and_timing_stats_left_out():
    def stat(name, mean, split=None, perturbation=None, count=3):
        return {"name": {"name": name, "split": split, **({"perturbation": perturbation} if perturbation else {})},
                "mean": mean, "count": count}

    stats = [stat("exact_match", 0.1, "valid"), stat("exact_match", 0.2, "test"), stat("f1", 0.3, "valid"),
             stat("exact_match", 0.9, "test", {"name": "typo"}), stat("inference_runtime", 5.0, "test"),
             stat("empty", 1.0, "test", count=0)]
    assert compare._main_stats(stats) == {"exact_match": (0.2, 3), "f1": (0.3, 3)}
